"""Errors that point at the user's code, against real processes: a backend defined in the
user's script that raises shows the script's own file and line, and only the frames that
help, to a handle caller and in the logs; a failure repeated at once is counted, not
printed again in full."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from typing import Any

import pytest

pytestmark = pytest.mark.integration

SCRIPT = """
import os, sys, httpx
import servekit as serve


def predict(request):
    scores = {"a": 1}
    return scores[request.query_params["key"]]  # line 8: raises KeyError


client = serve.start(http_options={"port": int(sys.argv[1])})
client.create_backend("clf:v1", predict)
client.create_endpoint("clf", backend="clf:v1", route="/clf")
try:
    client.get_handle("clf").remote(key="b").result(timeout=30)
except KeyError as exc:
    print("CAUGHT", repr(exc))
    print(str(exc.__cause__))
for _ in range(5):
    assert httpx.get(f"http://127.0.0.1:{sys.argv[1]}/clf", params={"key": "c"},
                     timeout=30).status_code == 500
print("LOGS", client._instance.instance_dir)
logs = os.path.join(client._instance.instance_dir, "logs")
for name in sorted(os.listdir(logs)):
    if name.startswith("replica"):
        with open(os.path.join(logs, name)) as f:
            print(f.read())
"""


def test_a_backend_from_the_users_script_shows_its_own_file_and_line(tmp_path: Any) -> None:
    from conftest import free_port

    script = tmp_path / "my_model.py"
    script.write_text(textwrap.dedent(SCRIPT))
    result = subprocess.run([sys.executable, str(script), str(free_port())],
                            capture_output=True, text=True, timeout=120, cwd=str(tmp_path),
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert result.returncode == 0, result.stderr
    out = result.stdout
    caller_tb = out[out.index("CAUGHT"):out.index("LOGS")]
    assert f'File "{script}", line 8, in predict' in caller_tb
    assert "<dynamic-code>" not in caller_tb and "servekit/_private" not in caller_tb
    assert "raised in backend 'clf:v1'" in caller_tb
    logs = out[out.index("LOGS"):]
    assert f'File "{script}", line 8, in predict' in logs
    assert "servekit/_private" not in logs and "asyncio" not in logs
    # The five HTTP failures are one kind: shown in full once, the rest counted.
    assert logs.count("KeyError: 'c'") == 1
    assert "raised while handling GET /clf" in logs
    # The driver's terminal shows the same lines (an embedded instance logs to it).
    assert f'File "{script}", line 8, in predict' in result.stderr
