"""Every example program runs to the end and prints what it promises."""

from __future__ import annotations

import ast
import errno
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
EXAMPLE_TIMEOUT_S = 60


def _port_busy(port: int) -> bool:
    with socket.socket() as sock:
        # As a server would: connections of earlier runs in TIME_WAIT do not count.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError as exc:
            return exc.errno == errno.EADDRINUSE
    return False


def _printed(lines: list, prefix: str) -> dict:
    matching = [line for line in lines if line.startswith(prefix)]
    assert len(matching) == 1, f"expected one line starting with {prefix!r} in {lines!r}"
    return ast.literal_eval(matching[0][len(prefix):].strip())


def test_quickstart_runs_and_prints_http_and_handle_results():
    if _port_busy(8000):
        pytest.skip("examples/quickstart.py serves on port 8000, which another program on "
                    "this machine is using")
    try:
        done = subprocess.run([sys.executable, str(EXAMPLES / "quickstart.py")],
                              capture_output=True, text=True, timeout=EXAMPLE_TIMEOUT_S,
                              cwd=EXAMPLES)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"quickstart.py did not finish within {EXAMPLE_TIMEOUT_S}s; "
                    f"output so far: {exc.stdout!r} {exc.stderr!r}")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert _printed(lines, "HTTP:") == {"text": "what a great day", "positive": True,
                                        "score": 0.25}
    assert _printed(lines, "handle:") == {"text": "a sad and rainy day", "positive": False,
                                          "score": 0.0}
    assert "Traceback" not in done.stderr
    assert not _port_busy(8000), "the example left its HTTP server running"
