"""``servekit build``: the deploy file that a ``module:function`` describes, as Ray's
``serve build`` writes one.

The function is called with the recording client of ``servekit run``; what it declares is
written with the ``working_dir`` it was imported from (relative to the file written, so
that the two can move together), and checked as ``servekit deploy`` would check it (every
backend imported, every problem at once) before it is written.
"""

from __future__ import annotations

import os
from typing import Any, Dict, Optional

from servekit._private.deploy.apply import plan_deploy
from servekit._private.deploy.recording import record
from servekit._private.deploy.schema import read_deploy_dict


def build_deploy_file(target: str, output: Optional[str]) -> str:
    """The YAML of the deploy file ``target`` (imported from the current directory)
    describes; ``output`` is where it will be written (None: printed).

    Raises:
        DeployFileError: what it declares would not deploy (every problem).
        Exception: whatever importing or calling the function raises.
    """
    import yaml

    directory = os.getcwd()
    declared = record(target, directory)
    file_directory = os.path.dirname(os.path.abspath(output)) if output else directory
    working_dir = os.path.relpath(directory, file_directory) if output else directory
    data: Dict[str, Any] = {"working_dir": working_dir, **declared}
    origin = output or f"{target} (to be written)"
    plan_deploy(None, read_deploy_dict(data, file_directory, origin=origin))
    header = (f"# The deploy file {target} describes (written by `servekit build`; "
              "`servekit deploy` applies it).\n")
    return header + yaml.safe_dump(data, sort_keys=False)
