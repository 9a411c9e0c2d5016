"""Undoing an apply that failed half-way: the inverse of each operation, from the state the
plan was made against, so that the instance goes back to what it ran before.

An inverse is worked out just before its operation runs (a replaced backend's definition is
read from the controller then). Operations on an endpoint the apply created have no inverse
of their own: deleting the endpoint undoes them. Deleting a backend cannot be undone; an
apply deletes backends last.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

from servekit._private.deploy.plan import Operation
from servekit._private.deploy.state import Client, RunningEndpoint, RunningState


def inverse(operation: Operation, before: RunningState, client: Client) -> List[Operation]:
    """The operations that undo ``operation`` once it has run (empty when nothing needs
    undoing, or nothing can)."""
    name, args = operation.name, operation.args
    if name == "create_backend":
        return [Operation("delete_backend", (args[0].spec.name, True))]
    if name == "redeploy_backend":
        tag = args[0].spec.name
        replica_config, metadata = client._call("get_backend_definition", tag)
        return [Operation("restore_backend", (tag, replica_config, metadata))]
    if name == "update_backend_config":
        tag, update = args
        return [Operation("update_backend_config", (tag, _config_before(before, tag, update)))]
    if name == "create_endpoint":
        return [Operation("delete_endpoint", (args[0],))]
    endpoint = before.endpoints.get(args[0])
    if endpoint is None:
        return []  # made by this apply: deleting it undoes this too
    if name == "update_endpoint":
        return [Operation("update_endpoint", (endpoint.name, endpoint.route, endpoint.methods,
                                              endpoint.managed))]
    if name == "set_traffic":
        return [Operation("set_traffic", (endpoint.name, endpoint.traffic))]
    if name == "shadow_traffic":
        tag = args[1]
        return [Operation("shadow_traffic", (endpoint.name, tag,
                                             endpoint.shadows.get(tag, 0.0)))]
    if name == "delete_endpoint":
        return _recreate(endpoint)
    return []


def _config_before(before: RunningState, tag: str, update: Dict[str, Any]) -> Dict[str, Any]:
    """The update that puts back the fields ``update`` changes (a fixed number of replicas
    and autoscaling replace each other, so a change of one restores whichever was set)."""
    config = before.backends[tag].config
    restore = {key: getattr(config, key) for key in update
               if key not in ("num_replicas", "autoscaling_config")}
    if "num_replicas" in update or "autoscaling_config" in update:
        if config.autoscaling_config is None:
            restore["num_replicas"] = config.num_replicas
            restore["autoscaling_config"] = None
        else:
            restore["autoscaling_config"] = config.autoscaling_config.model_dump(
                exclude_unset=True)
    return restore


def _recreate(endpoint: RunningEndpoint) -> List[Operation]:
    first: Optional[str] = next(iter(endpoint.traffic), None)
    if first is None:
        return []
    return [Operation("create_endpoint", (endpoint.name, first, endpoint.route,
                                          endpoint.methods, endpoint.managed)),
            Operation("set_traffic", (endpoint.name, endpoint.traffic)),
            *(Operation("shadow_traffic", (endpoint.name, tag, proportion))
              for tag, proportion in endpoint.shadows.items())]
