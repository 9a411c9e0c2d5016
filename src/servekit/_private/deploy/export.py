"""The running state as a deploy file that ``deploy`` accepts back unchanged, from any
directory.

Only what a file made can be written as a file: backends with a ``source`` and managed
endpoints whose backends are all written. Backends made through the Python API (their code
is a pickled object, not an import path) and the endpoints that use them are left out, and
listed in the file's header comment. The file records where the code was imported from
(``working_dir``: one for the file, or one per backend when they differ) and the name of
the file that made what it holds (``name``, when one file made it all; else its header
lists which file made what).
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any, Dict, List, Optional

from servekit._private.deploy.state import RunningBackend, RunningState


@dataclasses.dataclass(frozen=True)
class ExportedConfig:
    """A deploy file's contents (``data``), and what could not be written in it."""

    data: Dict[str, Any]
    left_out: List[str]  # "backend x (made through the Python API)", ...
    made_by: Dict[str, List[str]] = dataclasses.field(default_factory=dict)  # file -> objects

    def to_yaml(self) -> str:
        import yaml

        header = ["# The running servekit instance, as a deploy file (`servekit deploy` "
                  "accepts it back)."]
        if len(self.made_by) > 1:
            header.append("# Made by the deploy files:")
            header += [f"#   {name or '(no name)'}: {', '.join(objects)}"
                       for name, objects in sorted(self.made_by.items())]
        if self.left_out:
            header.append("# Left out (they cannot be written as a file):")
            header += [f"#   {item}" for item in self.left_out]
        return "\n".join(header) + "\n" + yaml.safe_dump(self.data, sort_keys=False)


def export_config(running: RunningState) -> ExportedConfig:
    """The deploy file of ``running``: its HTTP address, file-made backends and managed
    endpoints."""
    left_out: List[str] = []
    made_by: Dict[str, List[str]] = collections.defaultdict(list)
    backends: List[Dict[str, Any]] = []
    for backend in sorted(running.backends.values(), key=lambda b: b.name):
        entry = _backend_entry(backend)
        if isinstance(entry, str):
            left_out.append(f"backend {backend.name} ({entry})")
        else:
            backends.append(entry)
            made_by[(backend.source or {}).get("deploy", "")].append(f"backend {backend.name}")
    written = {entry["name"] for entry in backends}
    endpoints: List[Dict[str, Any]] = []
    for endpoint in sorted(running.endpoints.values(), key=lambda e: e.name):
        missing = sorted((set(endpoint.traffic) | set(endpoint.shadows)) - written)
        if endpoint.managed is None:
            left_out.append(f"endpoint {endpoint.name} (made through the Python API)")
        elif missing:
            left_out.append(f"endpoint {endpoint.name} (uses {', '.join(missing)}, left out)")
        else:
            endpoints.append({"name": endpoint.name, "route": endpoint.route,
                              "methods": list(endpoint.methods),
                              "traffic": dict(endpoint.traffic),
                              "shadows": dict(endpoint.shadows)})
            made_by[endpoint.managed].append(f"endpoint {endpoint.name}")
    data: Dict[str, Any] = {}
    if len(made_by) == 1 and next(iter(made_by)):
        data["name"] = next(iter(made_by))
    working_dir = _common_working_dir(backends)
    if working_dir is not None:
        data["working_dir"] = working_dir
        for entry in backends:
            del entry["working_dir"]
    if running.http:
        data["http_options"] = dict(running.http)
    data["backends"] = backends
    data["endpoints"] = endpoints
    return ExportedConfig(data, left_out, dict(made_by))


def _common_working_dir(backends: List[Dict[str, Any]]) -> Optional[str]:
    """The working directory of every backend entry, if they all have the same."""
    directories = {entry.get("working_dir") for entry in backends}
    if len(directories) != 1 or None in directories:
        return None
    return directories.pop()


def _backend_entry(backend: RunningBackend) -> Dict[str, Any] | str:
    """The file entry of a backend, or why it cannot have one."""
    import yaml

    if backend.source is None:
        return "made through the Python API"
    source = backend.source
    entry: Dict[str, Any] = {"name": backend.name, "import_path": source["import_path"]}
    for key in ("working_dir", "init_args", "ray_actor_options", "env"):
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
