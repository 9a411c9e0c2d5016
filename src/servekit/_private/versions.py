"""The software a servekit process runs. A client and the instance it calls must run the
same: what they exchange (servekit's own classes pickled, functions sent by value) is read
only by the versions that wrote it, and misread by others in ways that say nothing of why."""

from __future__ import annotations

import sys
from typing import Dict, Optional

# servekit's version (``servekit.__version__``; the package's metadata says the same).
SERVEKIT = "0.1.0"


def software() -> Dict[str, str]:
    """This process's servekit version and Python version (major.minor)."""
    return {"servekit": SERVEKIT, "python": "%d.%d" % sys.version_info[:2]}


def mismatch(instance: Optional[Dict[str, str]], where: str) -> Optional[str]:
    """What is wrong when the instance at ``where`` runs ``instance`` (None: a servekit
    older than this check), with how to fix it; None if it runs what this process runs."""
    ours = software()
    if instance == ours:
        return None
    if instance is None:
        runs = "an older servekit (its controller does not answer the 'version' call)"
        theirs = "the servekit it was started with"
    else:
        runs = f"servekit {instance.get('servekit')} on Python {instance.get('python')}"
        theirs = f"servekit {instance.get('servekit')} on Python {instance.get('python')}"
    return (f"The servekit instance at {where} runs {runs}; this process runs servekit "
            f"{ours['servekit']} on Python {ours['python']}, and the two cannot understand "
            f"each other. Shut the instance down (`servekit shutdown`, with {theirs}) and "
            "start it again with this one, or run this process with the instance's "
            "versions.")
