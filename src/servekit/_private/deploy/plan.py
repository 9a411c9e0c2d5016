"""Comparing a deploy spec with the running state: the ordered steps of an apply.

A plan is computed whole, and checked whole, before anything changes: references to
backends, routes, deletions of backends still in use and HTTP options are errors here, so
that an apply never stops half-way on something that could be known. The problems found
reading the file and importing its backends are raised with the plan's, in one error.

Order (each step valid when it runs): backends created, replaced or updated in place;
pruned endpoints whose route a file endpoint takes; endpoints created or updated (route and
methods, then traffic, then shadows); the other pruned endpoints; pruned backends. A step
moves earlier only to wait for what it needs: an endpoint for its backends, a backend for
the endpoints it may get handles to (``BackendDefinition.handles``: created first, so that
its constructor finds them).

A backend or endpoint belongs to the file (by its ``name``) that made it; ``prune`` deletes
only what this file's name made. A file describing what another made, as it runs, changes
nothing and leaves it with the other; what it changes it takes over.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple

from servekit._private.deploy.definition import DEFINITION_KEYS, BackendDefinition
from servekit._private.deploy.schema import DeploySpec, EndpointSpec, Problem
from servekit._private.deploy.state import RunningEndpoint, RunningState


class Action(str, enum.Enum):
    CREATE = "create"
    UPDATE = "update in place"
    REPLACE = "replace"
    DELETE = "delete"


@dataclasses.dataclass(frozen=True)
class Operation:
    """One call of an apply: ``name`` is a ``Client`` method or controller RPC."""

    name: str
    args: Tuple[Any, ...]


@dataclasses.dataclass(frozen=True)
class Step:
    """A change to one backend or endpoint, and the operations that make it."""

    action: Action
    kind: str  # "backend" or "endpoint"
    name: str
    changes: Tuple[str, ...]  # what differs, for people
    operations: Tuple[Operation, ...]

    def describe(self) -> str:
        text = f"{self.action.value:<16}{self.kind} {self.name}"
        return f"{text}: {'; '.join(self.changes)}" if self.changes else text


@dataclasses.dataclass(frozen=True)
class DeployPlan:
    """What an apply does (``steps``, in order) and what it leaves: ``unchanged`` objects of
    the file, ``kept`` file-made objects that left the file (``prune`` would delete them)."""

    steps: Tuple[Step, ...]
    unchanged: Tuple[str, ...]
    kept: Tuple[str, ...]
    origin: Optional[str] = None
    before: Optional[RunningState] = None  # what the plan was made against (to undo it)
    name: str = "deploy"  # the file's name: what it makes is marked with it

    @property
    def changes_anything(self) -> bool:
        return bool(self.steps)

    def operations(self) -> List[Operation]:
        return [operation for step in self.steps for operation in step.operations]

    def __str__(self) -> str:
        what = self.origin or "the spec"
        if not self.steps:
            lines = [f"No change: the instance already runs what {what} describes."]
        else:
            count = len(self.steps)
            lines = [f"Plan for {what}: {count} change{'s' if count != 1 else ''}."]
            lines += [f"  {step.describe()}" for step in self.steps]
        if self.steps and self.unchanged:
            lines.append(f"  {'no change':<16}{', '.join(self.unchanged)}")
        if self.kept:
            lines.append(f"  {'kept':<16}{', '.join(self.kept)} (made by a file named "
                         f"{self.name!r}, no longer in this one; --prune deletes them)")
        return "\n".join(lines)


def make_plan(spec: DeploySpec, definitions: Dict[str, BackendDefinition],
              running: RunningState, prune: bool = False,
              problems: Sequence[Problem] = ()) -> DeployPlan:
    """The plan that brings ``running`` to ``spec``.

    ``prune`` deletes what this file's name made (backends whose source, endpoints whose
    mark, has its name) that is not in ``spec``; objects made through the Python API, or
    under another name, are never deleted. ``problems``: found importing the backends.

    Raises:
        DeployFileError: the problems of ``spec`` and ``problems``, and the plan's: the
            file's HTTP options differ from the running instance's; an endpoint names a
            backend that will not exist, or mixes ASGI apps with other backends; a route is
            taken, or ends with "/" for an ASGI app; a backend to delete is still used —
            every problem, with its place.
    """
    found: List[Problem] = [*spec.problems, *problems, *_http_problems(spec, running)]
    unchanged: List[str] = []
    backend_steps: List[Step] = []
    for name, definition in definitions.items():
        step = _backend_step(definition, running)
        if step is None:
            unchanged.append(f"backend {name}")
        else:
            backend_steps.append(step)

    def ours(mark: Optional[str]) -> bool:  # "": made by a file before files had names
        return mark in (spec.name, "")

    gone_backends = sorted(b.name for b in running.backends.values() if b.source is not None
                           and ours(b.source.get("deploy", "")) and b.name not in spec.backends
                           and b.name not in spec.declared_backends)
    gone_endpoints = sorted(e.name for e in running.endpoints.values()
                            if ours(e.managed) and e.name not in spec.endpoints)
    deleted_backends = gone_backends if prune else []
    deleted_endpoints = gone_endpoints if prune else []

    available = (set(spec.declared_backends) | set(spec.backends) |
                 (set(running.backends) - set(deleted_backends)))
    early_deletes: Dict[str, str] = {}  # endpoint -> the pruned endpoint holding its route
    endpoint_steps: List[Step] = []
    for endpoint in spec.endpoints.values():
        found += _reference_problems(endpoint, available, deleted_backends)
        found += _kind_problems(endpoint, definitions)
        holder = _route_holder(endpoint, running)
        if holder is not None:
            if holder in deleted_endpoints:
                early_deletes[endpoint.name] = holder
            else:
                found.append((endpoint.place + ("route",),
                              f"{endpoint.route!r} is the route of running endpoint "
                              f"{holder!r}; {_holder_hint(holder, spec)}"))
        step = _endpoint_step(endpoint, running.endpoints.get(endpoint.name), spec.name)
        if step is None:
            unchanged.append(f"endpoint {endpoint.name}")
        else:
            endpoint_steps.append(step)

    remaining_endpoints = {**{n: (e.traffic, e.shadows) for n, e in running.endpoints.items()
                              if n not in deleted_endpoints},
                           **{n: (e.traffic, e.shadows) for n, e in spec.endpoints.items()}}
    for tag in deleted_backends:
        users = sorted(n for n, (traffic, shadows) in remaining_endpoints.items()
                       if tag in traffic or tag in shadows)
        if users:
            found.append((("backends",), f"backend {tag!r} left the file and --prune would "
                                         f"delete it, but endpoint(s) {', '.join(users)} "
                                         "still use it; keep it in the file, or take it out "
                                         "of their traffic and shadows"))
    if found:
        raise spec.error(found)

    def delete(kind: str, name: str) -> Step:
        return Step(Action.DELETE, kind, name, ("left the file",),
                    (Operation(f"delete_{kind}", (name,)),))

    early = [delete("endpoint", n) for n in sorted(set(early_deletes.values()))]
    steps = _in_order(backend_steps + early + endpoint_steps, spec, definitions, early_deletes)
    late_deletes = [n for n in deleted_endpoints if n not in early_deletes.values()]
    steps += ([delete("endpoint", n) for n in late_deletes]
              + [delete("backend", n) for n in deleted_backends])
    kept = [] if prune else [f"backend {n}" for n in gone_backends] + \
        [f"endpoint {n}" for n in gone_endpoints]
    return DeployPlan(tuple(steps), tuple(unchanged), tuple(kept), spec.origin, running,
                      spec.name)


def _in_order(steps: List[Step], spec: DeploySpec, definitions: Dict[str, BackendDefinition],
              early_deletes: Dict[str, str]) -> List[Step]:
    """``steps`` in their order, but each after the steps it needs: an endpoint's after its
    backends' and after the deletion of the pruned endpoint holding its route; a backend's
    after the creation of the endpoints its code gets handles to. Among the steps whose
    needs are met, the earliest goes first; a cycle (a backend getting a handle to its own
    endpoint) is broken in the same order."""
    index = {(step.kind, step.name, step.action): i for i, step in enumerate(steps)}

    def at(kind: str, name: str, *actions: Action) -> Set[int]:
        return {index[(kind, name, a)] for a in actions if (kind, name, a) in index}

    needs: List[Set[int]] = []
    for step in steps:
        if step.kind == "endpoint" and step.action is not Action.DELETE:
            endpoint = spec.endpoints[step.name]
            wanted = {i for tag in [*endpoint.traffic, *endpoint.shadows] for i in
                      at("backend", tag, Action.CREATE, Action.REPLACE, Action.UPDATE)}
            holder = early_deletes.get(step.name)
            if holder is not None:
                wanted |= at("endpoint", holder, Action.DELETE)
        elif step.kind == "backend":
            wanted = {i for name in sorted(definitions[step.name].handles)
                      for i in at("endpoint", name, Action.CREATE)}
        else:
            wanted = set()
        needs.append(wanted)
    done: Set[int] = set()
    ordered: List[Step] = []
    while len(done) < len(steps):
        waiting = [i for i in range(len(steps)) if i not in done]
        ready = [i for i in waiting if needs[i] <= done] or waiting
        done.add(ready[0])
        ordered.append(steps[ready[0]])
    return ordered


def _http_problems(spec: DeploySpec, running: RunningState) -> List[Problem]:
    """The file's HTTP options that differ from what the instance's proxies serve."""
    wanted = spec.http_options or {}
    differ = [f"{key} is {running.http[key]!r}, the file says {wanted[key]!r}"
              for key in sorted(wanted) if key in running.http
              and wanted[key] != running.http[key] and not (key == "port" and wanted[key] == 0)]
    if not differ:
        return []
    return [(("http_options",), f"the running instance's HTTP options differ "
             f"({'; '.join(differ)}). They change only with a restart: `servekit shutdown "
             "--keep-state`, then `servekit deploy` again (it starts an instance with the "
             "file's options and its backends and endpoints come back)")]


def _backend_step(definition: BackendDefinition, running: RunningState) -> Optional[Step]:
    spec = definition.spec
    current = running.backends.get(spec.name)
    if current is None:
        return Step(Action.CREATE, "backend", spec.name, (),
                    (Operation("create_backend", (definition,)),))
    operations: List[Operation] = []
    changes: List[str] = []
    action = Action.UPDATE
    if current.source is None or \
            current.source.get("revision") != definition.source["revision"]:
        action = Action.REPLACE
        changes.append(_source_changes(current.source, definition.source) +
                       " (rolling replacement)")
        operations.append(Operation("redeploy_backend", (definition,)))
    wanted, now = spec.config.model_dump(), current.config.model_dump()
    update = {key: value for key, value in wanted.items() if now.get(key) != value}
    if spec.config.autoscaling_config is not None:
        update.pop("num_replicas", None)  # autoscaling decides it; the two are exclusive
    if update:
        changes += [_field_change(key, now.get(key), value) for key, value in update.items()]
        operations.append(Operation("update_backend_config", (spec.name, update)))
    if not operations:
        return None
    return Step(action, "backend", spec.name, tuple(changes), tuple(operations))


def _field_change(key: str, before: Any, after: Any) -> str:
    """``key before -> after``; for two dicts (``autoscaling_config``) only the keys that
    differ, as ``key.sub before -> after``."""
    if isinstance(before, dict) and isinstance(after, dict):
        return "; ".join(f"{key}.{sub} {before.get(sub)!r} -> {after.get(sub)!r}"
                         for sub in sorted(before.keys() | after.keys())
                         if before.get(sub) != after.get(sub))
    return f"{key} {before!r} -> {after!r}"


def _source_changes(before: Optional[Dict[str, Any]], after: Dict[str, Any]) -> str:
    if before is None:
        return "made through the Python API, now defined by the file"
    changed = [key for key in DEFINITION_KEYS if before.get(key) != after[key]]
    labels = [_code_change(before.get(key) or {}, after[key]) if key == "files" else
              f"{key} {before.get(key)!r} -> {after[key]!r}" for key in changed]
    return "; ".join(labels) or "definition changed"


def _code_change(before: Dict[str, str], after: Dict[str, str]) -> str:
    """``code changed: model.py (edited), util.py (new)``."""
    what = [f"{path} ({'edited' if path in before else 'new'})" for path in sorted(after)
            if before.get(path) != after[path]]
    what += [f"{path} (no longer imported)" for path in sorted(set(before) - set(after))]
    return f"code changed: {', '.join(what)}"


def _endpoint_step(endpoint: EndpointSpec, current: Optional[RunningEndpoint],
                   deploy: str) -> Optional[Step]:
    name = endpoint.name
    if current is None:
        first = max(endpoint.traffic, key=lambda tag: endpoint.traffic[tag])
        operations = [Operation("create_endpoint",
                                (name, first, endpoint.route, endpoint.methods, deploy))]
        if endpoint.traffic != {first: 1.0}:
            operations.append(Operation("set_traffic", (name, endpoint.traffic)))
        operations += [Operation("shadow_traffic", (name, tag, proportion))
                       for tag, proportion in endpoint.shadows.items()]
        route = endpoint.route or "handle only"
        return Step(Action.CREATE, "endpoint", name, (route,), tuple(operations))
    operations, changes = [], []
    if (current.route, current.methods) != (endpoint.route, endpoint.methods) or \
            current.managed is None:
        operations.append(Operation("update_endpoint",
                                    (name, endpoint.route, endpoint.methods, deploy)))
        changes += [f"{label} {before!r} -> {after!r}" for label, before, after in (
            ("route", current.route, endpoint.route),
            ("methods", current.methods, endpoint.methods)) if before != after]
        if current.managed is None:
            changes.append("made through the Python API, now managed by the file")
    if current.traffic != endpoint.traffic:
        operations.append(Operation("set_traffic", (name, endpoint.traffic)))
        changes.append(f"traffic {current.traffic} -> {endpoint.traffic}")
    shadows = {**{tag: 0.0 for tag in current.shadows}, **endpoint.shadows}
    for tag, proportion in shadows.items():
        if current.shadows.get(tag, 0.0) != proportion:
            operations.append(Operation("shadow_traffic", (name, tag, proportion)))
            changes.append(f"shadow {tag} {current.shadows.get(tag, 0.0):g} -> {proportion:g}")
    if not operations:
        return None
    return Step(Action.UPDATE, "endpoint", name, tuple(changes), tuple(operations))


def _reference_problems(endpoint: EndpointSpec, available: Set[str],
                        deleted: List[str]) -> List[Problem]:
    problems: List[Problem] = []
    for field, tags in (("traffic", endpoint.traffic), ("shadows", endpoint.shadows)):
        for tag in tags:
            if tag in available:
                continue
            why = ("left the file and --prune deletes it; keep it in the file"
                   if tag in deleted else "is neither in the file nor running; define it "
                   "under backends, or check its spelling")
            problems.append((endpoint.place + (field, tag), f"backend {tag!r} {why}"))
    return problems


def _kind_problems(endpoint: EndpointSpec,
                   definitions: Dict[str, BackendDefinition]) -> List[Problem]:
    """An endpoint's backends of the file are all ASGI apps or none is; an ASGI app's route
    is a prefix, without a trailing "/" (what the instance would refuse mid-apply)."""
    kinds = {tag: definitions[tag].metadata.asgi
             for tag in [*endpoint.traffic, *endpoint.shadows] if tag in definitions}
    apps = sorted(tag for tag, asgi in kinds.items() if asgi)
    others = sorted(tag for tag, asgi in kinds.items() if not asgi)
    problems: List[Problem] = []
    if apps and others:
        problems.append((endpoint.place + ("traffic",),
                         f"mixes ASGI apps ({', '.join(apps)}) with other backends "
                         f"({', '.join(others)}): a request to it must suit any of its "
                         "backends; serve the others from an endpoint of their own"))
    route = endpoint.route
    if apps and route is not None and route != "/" and route.endswith("/"):
        problems.append((endpoint.place + ("route",),
                         f"{route!r} ends with '/', but {apps[0]} is an ASGI app, whose "
                         f"route is a prefix holding the paths under it; use "
                         f"{route.rstrip('/') or '/'!r}"))
    return problems


def _route_holder(endpoint: EndpointSpec, running: RunningState) -> Optional[str]:
    """The running endpoint, other than this one, that has this endpoint's route."""
    if endpoint.route is None:
        return None
    for other in running.endpoints.values():
        if other.name != endpoint.name and other.route == endpoint.route:
            return other.name
    return None


def _holder_hint(holder: str, spec: DeploySpec) -> str:
    if holder in spec.endpoints:
        return ("the file moves it elsewhere, but routes are changed one endpoint at a "
                "time: deploy the move first, then this route")
    return "delete that endpoint (or give it another route) first, or pick another route"
