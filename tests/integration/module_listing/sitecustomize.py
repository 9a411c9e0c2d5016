"""Imported at start by every Python process whose PYTHONPATH holds this directory (as
site imports ``sitecustomize``): with ``SERVEKIT_TEST_MODULES_DIR`` set, the process writes
the names of the modules it has loaded to ``<that directory>/<its pid>`` on SIGUSR1.
"""

import os
import signal
import sys


def _write_modules(signum: int, frame: object) -> None:
    path = os.path.join(os.environ["SERVEKIT_TEST_MODULES_DIR"], str(os.getpid()))
    with open(path + ".part", "w") as listing:
        listing.write("\n".join(sorted(sys.modules)))
    os.replace(path + ".part", path)  # whole, or not there yet


if "SERVEKIT_TEST_MODULES_DIR" in os.environ:
    signal.signal(signal.SIGUSR1, _write_modules)
