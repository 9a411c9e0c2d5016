"""A project directory with backend modules, and a running state that matches a spec."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path
from typing import Any, Dict, Iterator

import pytest

from servekit._private.deploy.definition import BackendDefinition, forget_local_modules
from servekit._private.deploy.schema import DeploySpec
from servekit._private.deploy.state import RunningBackend, RunningEndpoint, RunningState

MODELS = textwrap.dedent("""
    class Classifier:
        def __init__(self, weights="w"):
            self.weights = weights

        def reconfigure(self, user_config):
            self.user_config = user_config

        def __call__(self, request):
            return self.weights


    def echo(request):
        return "echo"
""")


@pytest.fixture
def project(tmp_path: Path) -> Iterator[Path]:
    """A directory holding ``models.py``; its modules are forgotten afterwards."""
    (tmp_path / "models.py").write_text(MODELS)
    yield tmp_path
    forget_local_modules(str(tmp_path))
    while str(tmp_path) in sys.path:
        sys.path.remove(str(tmp_path))


def running_as(spec: DeploySpec, definitions: Dict[str, BackendDefinition],
               http: Dict[str, Any] | None = None) -> RunningState:
    """The state of an instance that runs exactly ``spec``."""
    backends = {name: RunningBackend(name, d.source, d.spec.config)
                for name, d in definitions.items()}
    endpoints = {name: RunningEndpoint(name, e.route, e.methods, e.traffic, e.shadows, spec.name)
                 for name, e in spec.endpoints.items()}
    return RunningState(backends, endpoints, http or {})
