"""Giving the system back the memory a process has freed."""

from __future__ import annotations

import ctypes


def release_freed_memory() -> None:
    """Give the system back the heap pages no object uses any more: glibc keeps them
    otherwise. A worker's start-up frees much of what it used, most where no bytecode cache
    is written (``PYTHONDONTWRITEBYTECODE``, a read-only install): every module's source is
    compiled then, and its syntax trees freed. Nothing without glibc."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # another C library
        return
    trim(0)
