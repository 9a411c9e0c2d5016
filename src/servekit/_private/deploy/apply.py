"""Applying a deploy spec to a running instance: validate it whole, plan, then carry out the
plan's operations in order through a ``Client``."""

from __future__ import annotations

import os
import uuid
from typing import Any, Callable, Dict, List, Mapping, Optional, Union

from servekit._private.backend_metadata import BackendMetadata, ReplicaConfig
from servekit._private.backend_settings import given_fields
from servekit._private.deploy.definition import BackendDefinition, check_definitions
from servekit._private.deploy.plan import DeployPlan, Operation, make_plan
from servekit._private.deploy.schema import DeploySpec, read_deploy_dict, read_deploy_file
from servekit._private.deploy.state import Client, RunningState, read_state
from servekit._private.deploy.undo import inverse
from servekit.exceptions import ServeError

DeployConfig = Union[str, "os.PathLike[str]", Mapping[str, Any], DeploySpec]


class DeployStepError(ServeError):
    """An operation of an apply failed (a constructor raised, the instance refused); what
    the apply had changed before it was undone (the message says if something could not
    be)."""


def load_spec(config: DeployConfig) -> DeploySpec:
    """A deploy file's path, a dict of its contents (import paths found from the current
    directory), or a spec already read -> a ``DeploySpec``, with the problems found reading
    it (``plan_deploy`` raises them with its own).

    Raises:
        DeployFileError: the file cannot be read or is not YAML.
    """
    if isinstance(config, DeploySpec):
        return config
    if isinstance(config, (str, os.PathLike)):
        return read_deploy_file(os.fspath(config))
    return read_deploy_dict(dict(config), os.getcwd())


def plan_deploy(client: Optional[Client], spec: DeploySpec, prune: bool = False) -> DeployPlan:
    """Import the spec's backends and plan it against ``client``'s instance (an empty one
    when ``client`` is None).

    Raises:
        DeployFileError: every problem of the file, its backends' imports and the plan, at
            once.
    """
    definitions, problems = check_definitions(spec)
    running = RunningState.empty() if client is None else read_state(client)
    return make_plan(spec, definitions, running, prune, problems)


def apply_plan(client: Client, plan: DeployPlan,
               on_step: Optional[Callable[[str], None]] = None) -> None:
    """Carry out ``plan`` in order; ``on_step`` is told of each step as it starts. If an
    operation fails, the ones that ran before it are undone, newest first, so the instance
    runs what it ran before the apply.

    Raises:
        DeployStepError: an operation failed; says which, and whether undoing worked.
    """
    before = plan.before if plan.before is not None else read_state(client)
    undo: List[Operation] = []
    for step in plan.steps:
        if on_step is not None:
            on_step(step.describe())
        for operation in step.operations:
            inverse_operations = inverse(operation, before, client)
            try:
                _run(client, operation)
            except Exception as exc:
                raise DeployStepError(f"{step.describe()} failed: {type(exc).__name__}: "
                                      f"{exc}. {_undo(client, undo)}") from exc
            undo[:0] = inverse_operations


def _undo(client: Client, operations: List[Operation]) -> str:
    """Run ``operations``; say what came of it."""
    if not operations:
        return "Nothing had been changed."
    failed = []
    for operation in operations:
        try:
            _run(client, operation)
        except Exception as exc:
            failed.append(f"{operation.name}{operation.args[:1]}: {type(exc).__name__}: {exc}")
    if failed:
        return (f"Undoing what the apply had changed failed for {len(failed)} of "
                f"{len(operations)} operation(s): {'; '.join(failed)}. Check `servekit "
                "status`.")
    return "What the apply had changed before it was undone: the instance runs what it " \
           "ran before."


def _run(client: Client, operation: Operation) -> None:
    _OPERATIONS[operation.name](client, *operation.args)


def deploy(client: Client, config: DeployConfig, *, prune: bool = False,
           dry_run: bool = False) -> DeployPlan:
    """Validate ``config``, plan it against ``client``'s instance, and apply the plan unless
    ``dry_run``. See ``Client.deploy``."""
    plan = plan_deploy(client, load_spec(config), prune)
    if not dry_run:
        apply_plan(client, plan)
    return plan


def _create_backend(client: Client, definition: BackendDefinition) -> None:
    goal = client._call("create_backend", definition.spec.name, definition.replica_config(),
                        given_fields(definition.spec.config), definition.metadata,
                        uuid.uuid4().hex)
    client._wait_for_goal(goal)


def _redeploy_backend(client: Client, definition: BackendDefinition) -> None:
    goal = client._call("redeploy_backend", definition.spec.name,
                        definition.replica_config(), definition.metadata)
    client._wait_for_goal(goal)


def _restore_backend(client: Client, tag: str, replica_config: ReplicaConfig,
                     metadata: Optional[BackendMetadata]) -> None:
    client._wait_for_goal(client._call("redeploy_backend", tag, replica_config, metadata))


def _create_endpoint(client: Client, name: str, backend: str, route: Optional[str],
                     methods: list, managed: Optional[str]) -> None:
    client._call("create_endpoint", name, backend, route, methods, managed)


def _update_endpoint(client: Client, name: str, route: Optional[str], methods: list,
                     managed: Optional[str]) -> None:
    client._call("update_endpoint", name, route, methods, managed)


_OPERATIONS: Dict[str, Callable[..., Any]] = {
    "create_backend": _create_backend,
    "redeploy_backend": _redeploy_backend,
    "restore_backend": _restore_backend,
    "update_backend_config": lambda client, *args: client.update_backend_config(*args),
    "create_endpoint": _create_endpoint,
    "update_endpoint": _update_endpoint,
    "set_traffic": lambda client, *args: client.set_traffic(*args),
    "shadow_traffic": lambda client, *args: client.shadow_traffic(*args),
    "delete_endpoint": lambda client, *args: client.delete_endpoint(*args),
    "delete_backend": lambda client, *args: client.delete_backend(*args),
}

