"""The endpoint table: routes, methods, traffic splits and shadows, and their rules.

Every change is checked against the whole table (and the backends registered) before it is
made, so a refused change leaves the table as it was. The controller saves and publishes the
table after each change.

An endpoint whose backends are ASGI apps serves its route as a prefix (the longest prefix
holding a path wins, an exact route beating a prefix of the same path); its backends are
all ASGI apps, or none is, so that every request to it can go to any of them.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Collection, Dict, List, Optional

from servekit._private.config_checks import check_methods, check_name, check_route, checked
from servekit._private.specs import EndpointInfo


class EndpointTable:
    """Endpoints by name; ``backends`` tells which backend tags are registered, ``asgi``
    whether a backend is an ASGI app (None: not known yet, its definition is an import
    path no replica has loaded)."""

    def __init__(self, backends: Callable[[], Collection[str]],
                 asgi: Callable[[str], Optional[bool]] = lambda tag: False) -> None:
        self.endpoints: Dict[str, EndpointInfo] = {}
        self._backends = backends
        self._asgi = asgi

    def create(self, name: str, backend: str, route: Optional[str], methods: List[str],
               managed: Optional[str] = None) -> bool:
        """Add an endpoint sending all its traffic to ``backend``; False if this very
        endpoint exists already (a retried call)."""
        methods = self._checked(name, route, methods)
        if backend not in self._backends():
            raise ValueError(f"Attempted to assign traffic to a backend '{backend}' that "
                             "is not registered. Create it first with create_backend().")
        existing = self.endpoints.get(name)
        if existing is not None:
            if existing.route == route and existing.methods == methods and \
                    existing.traffic == {backend: 1.0}:
                return False
            raise ValueError(f"Cannot create endpoint. Endpoint '{name}' is already "
                             "registered. Delete it first, or pick another name.")
        self._check_route_free(name, route)
        if self._asgi(backend):
            self._check_prefix(route)
        self.endpoints[name] = EndpointInfo(name, route, methods, {backend: 1.0},
                                            managed=managed)
        return True

    def update(self, name: str, route: Optional[str], methods: List[str],
               managed: Optional[str]) -> None:
        """Change an endpoint's route, methods and mark (the deploy file that made it) in
        place."""
        methods = self._checked(name, route, methods)
        endpoint = self._endpoint(name, "update")
        self._check_route_free(name, route)
        if self._serves_asgi(endpoint):
            self._check_prefix(route)
        endpoint.route, endpoint.methods, endpoint.managed = route, list(methods), managed

    def copy(self) -> Dict[str, EndpointInfo]:
        """A copy of the endpoints that later changes do not reach (for ``restore``)."""
        return {name: dataclasses.replace(info, methods=list(info.methods),
                                          traffic=dict(info.traffic),
                                          shadows=dict(info.shadows))
                for name, info in self.endpoints.items()}

    def restore(self, endpoints: Dict[str, EndpointInfo]) -> None:
        """Go back to a ``copy``: a change that could not be saved is undone."""
        self.endpoints = endpoints

    def delete(self, name: str) -> bool:
        """Remove an endpoint; False if there was none."""
        return self.endpoints.pop(name, None) is not None

    def set_traffic(self, name: str, traffic: Dict[str, float]) -> None:
        endpoint = self._endpoint(name, "assign traffic for")
        self._check_backends_exist(traffic, "assign traffic to")
        for tag, weight in traffic.items():
            if weight < 0:
                raise ValueError(f"Attempted to assign a weight of {weight} to backend "
                                 f"'{tag}'. Weights cannot be negative.")
        total = math.fsum(traffic.values())
        if not math.isclose(total, 1.0, rel_tol=0.0, abs_tol=1e-8):
            raise ValueError(f"Traffic dictionary weights must sum to 1, currently they "
                             f"sum to {total}. Got {traffic}.")
        self._check_same_kind(endpoint, [*traffic, *endpoint.shadows])
        if any(self._asgi(tag) for tag in traffic):
            self._check_prefix(endpoint.route)
        endpoint.traffic = dict(traffic)

    def shadow_traffic(self, name: str, backend: str, proportion: float) -> None:
        self._check_backends_exist({backend: proportion}, "shadow traffic to")
        endpoint = self._endpoint(name, "shadow traffic from")
        if proportion != 0:
            self._check_same_kind(endpoint, [*endpoint.traffic, backend])
        if proportion == 0:
            endpoint.shadows.pop(backend, None)
        else:
            endpoint.shadows[backend] = float(proportion)

    def user_of(self, backend: str) -> Optional[str]:
        """The name of an endpoint whose traffic or shadows use ``backend``, if any."""
        return next((e.name for e in self.endpoints.values() if e.uses(backend)), None)

    def describe(self) -> Dict[str, dict]:
        return {name: info.describe() for name, info in self.endpoints.items()}

    def view(self) -> Dict[str, EndpointInfo]:
        """A copy of the table to publish (later changes do not reach it)."""
        return {name: EndpointInfo(**{**vars(info), "traffic": dict(info.traffic),
                                      "shadows": dict(info.shadows),
                                      "asgi": self._serves_asgi(info)})
                for name, info in self.endpoints.items()}

    def apps(self) -> Dict[str, bool]:
        """Whether each endpoint serves ASGI apps (its route is a prefix), by name."""
        return {name: self._serves_asgi(info) for name, info in self.endpoints.items()}

    def mixed(self) -> List[str]:
        """Why each endpoint that mixes ASGI apps with other backends does (possible only
        when a backend given by import path turned out, once loaded, to be of the other
        kind: its requests suit only some of its backends)."""
        problems = []
        for endpoint in self.endpoints.values():
            try:
                self._check_same_kind(endpoint, [*endpoint.traffic, *endpoint.shadows])
            except ValueError as exc:
                problems.append(str(exc))
        return problems

    def _serves_asgi(self, endpoint: EndpointInfo) -> bool:
        return any(self._asgi(tag) for tag in endpoint.traffic)

    def _check_same_kind(self, endpoint: EndpointInfo, tags: List[str]) -> None:
        """Refuse to mix ASGI apps with other backends in one endpoint."""
        kinds = {tag: self._asgi(tag) for tag in tags}
        apps = sorted(tag for tag, asgi in kinds.items() if asgi)
        others = sorted(tag for tag, asgi in kinds.items() if asgi is False)
        if apps and others:
            raise ValueError(
                f"Endpoint '{endpoint.name}' cannot mix ASGI apps ({apps}) with other "
                f"backends ({others}): a request to it must suit any of its backends. Serve "
                "the other backends from an endpoint of their own.")

    @staticmethod
    def _check_prefix(route: Optional[str]) -> None:
        if route is not None and route != "/" and route.endswith("/"):
            raise ValueError(
                f"Route '{route}' ends with '/': the route of an ASGI app is a prefix, which "
                f"holds the paths under it. Use '{route.rstrip('/') or '/'}'.")

    @staticmethod
    def _checked(name: str, route: Optional[str], methods: List[str]) -> List[str]:
        """The checks of the API and deploy files, again (a call may come from elsewhere);
        the methods upper-cased and sorted."""
        checked("endpoint_name", check_name, name)
        if route is not None:
            checked("route", check_route, route)
        return checked("methods", check_methods, methods)

    def _endpoint(self, name: str, action: str) -> EndpointInfo:
        endpoint = self.endpoints.get(name)
        if endpoint is None:
            raise ValueError(f"Attempted to {action} an endpoint '{name}' that is not "
                             f"registered. Registered endpoints: {sorted(self.endpoints)}.")
        return endpoint

    def _check_route_free(self, name: str, route: Optional[str]) -> None:
        if route is None:
            return
        for other in self.endpoints.values():
            if other.route == route and other.name != name:
                raise ValueError(
                    f"Cannot create endpoint. Route '{route}' is already registered "
                    f"to endpoint '{other.name}'.")

    def _check_backends_exist(self, tags: Dict[str, float], action: str) -> None:
        registered = self._backends()
        for tag in tags:
            if tag not in registered:
                raise ValueError(f"Attempted to {action} a backend '{tag}' that is not "
                                 f"registered. Registered backends: {sorted(registered)}.")
