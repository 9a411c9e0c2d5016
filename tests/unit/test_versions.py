"""A client and an instance of different servekit or Python versions are told apart."""

from __future__ import annotations

import sys

from servekit._private import versions


def test_the_same_software_is_no_mismatch() -> None:
    assert versions.mismatch(versions.software(), "/tmp/x.sock") is None
    assert versions.software()["python"] == f"{sys.version_info[0]}.{sys.version_info[1]}"


def test_another_version_is_named_with_this_one_and_the_fix() -> None:
    theirs = {**versions.software(), "servekit": "0.0.1"}
    problem = versions.mismatch(theirs, "/tmp/x.sock")
    assert problem is not None
    assert "/tmp/x.sock runs servekit 0.0.1" in problem
    assert f"this process runs servekit {versions.SERVEKIT}" in problem
    assert "servekit shutdown" in problem


def test_another_python_is_a_mismatch_too() -> None:
    """Functions sent by value are pickled by one Python for the same Python."""
    theirs = {**versions.software(), "python": "3.9"}
    assert "on Python 3.9" in (versions.mismatch(theirs, "addr") or "")


def test_a_controller_without_the_version_call_is_an_older_servekit() -> None:
    problem = versions.mismatch(None, "addr")
    assert problem is not None and "an older servekit" in problem
