"""The running state as a deploy file that ``deploy`` accepts back unchanged.

Only what a file made can be written as a file: backends with a ``source`` and managed
endpoints whose backends are all written. Backends made through the Python API (their code
is a pickled object, not an import path) and the endpoints that use them are left out, and
listed in the file's header comment.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, List

from servekit._private.deploy.state import RunningBackend, RunningState


@dataclasses.dataclass(frozen=True)
class ExportedConfig:
    """A deploy file's contents (``data``), and what could not be written in it."""

    data: Dict[str, Any]
    left_out: List[str]  # "backend x (made through the Python API)", ...

    def to_yaml(self) -> str:
        import yaml

        header = ["# The running servekit instance, as a deploy file (`servekit deploy` "
                  "accepts it back)."]
        if self.left_out:
            header.append("# Left out (they cannot be written as a file):")
            header += [f"#   {item}" for item in self.left_out]
        return "\n".join(header) + "\n" + yaml.safe_dump(self.data, sort_keys=False)


def export_config(running: RunningState) -> ExportedConfig:
    """The deploy file of ``running``: its HTTP address, file-made backends and managed
    endpoints."""
    left_out: List[str] = []
    backends: List[Dict[str, Any]] = []
    for backend in sorted(running.backends.values(), key=lambda b: b.name):
        entry = _backend_entry(backend)
        if isinstance(entry, str):
            left_out.append(f"backend {backend.name} ({entry})")
        else:
            backends.append(entry)
    written = {entry["name"] for entry in backends}
    endpoints: List[Dict[str, Any]] = []
    for endpoint in sorted(running.endpoints.values(), key=lambda e: e.name):
        missing = sorted((set(endpoint.traffic) | set(endpoint.shadows)) - written)
        if not endpoint.managed:
            left_out.append(f"endpoint {endpoint.name} (made through the Python API)")
        elif missing:
            left_out.append(f"endpoint {endpoint.name} (uses {', '.join(missing)}, left out)")
        else:
            endpoints.append({"name": endpoint.name, "route": endpoint.route,
                              "methods": list(endpoint.methods),
                              "traffic": dict(endpoint.traffic),
                              "shadows": dict(endpoint.shadows)})
    data: Dict[str, Any] = {}
    if running.http:
        data["http_options"] = dict(running.http)
    data["backends"] = backends
    data["endpoints"] = endpoints
    return ExportedConfig(data, left_out)


def _backend_entry(backend: RunningBackend) -> Dict[str, Any] | str:
    """The file entry of a backend, or why it cannot have one."""
    import yaml

    if backend.source is None:
        return "made through the Python API"
    source = backend.source
    entry: Dict[str, Any] = {"name": backend.name, "import_path": source["import_path"]}
    for key in ("init_args", "ray_actor_options", "env"):
        if source.get(key):
            entry[key] = source[key]
    config = backend.config.model_dump(exclude_defaults=True)
    if config:
        entry["config"] = config
    try:
        yaml.safe_dump(entry)
    except yaml.YAMLError:
        return "its user_config cannot be written as YAML"
    return entry
