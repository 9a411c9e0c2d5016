"""The JSON no-op on LitServe, the peer of servekit's JSON POST in the ``peers`` scenario of
benchmarks/suite.py: one API server, one CPU worker, ZeroMQ between them (``fast_queue``),
access logs off. Serves ``POST /predict`` until stopped.

    python benchmarks/litserve_noop.py PORT
"""

import os
import signal
import sys
import threading
import time
from typing import Any

import litserve as ls


class Noop(ls.LitAPI):
    def decode_request(self, request, **kwargs: Any) -> Any:  # type: ignore[no-untyped-def]
        # (``request`` unannotated: LitServe then parses the body as JSON)
        return request

    def predict(self, x: Any, **kwargs: Any) -> Any:
        return x

    def encode_response(self, output: Any, **kwargs: Any) -> Any:
        return {"output": "ok"}


def stop_with(parent: int) -> None:
    """Stop this process group once ``parent`` is gone (a suite killed by its timeout then
    leaves no server and no worker behind)."""
    while os.getppid() == parent:
        time.sleep(0.5)
    os.killpg(os.getpgrp(), signal.SIGTERM)


if __name__ == "__main__":
    if os.getpgrp() == os.getpid():  # (started in a group of its own, as the suite does)
        threading.Thread(target=stop_with, args=(os.getppid(),), daemon=True).start()
    server = ls.LitServer(Noop(), accelerator="cpu", devices=1, workers_per_device=1,
                          fast_queue=True)
    server.run(host="127.0.0.1", port=int(sys.argv[1]), num_api_servers=1,
               log_level="warning", generate_client_file=False)
