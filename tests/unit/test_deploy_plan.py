"""Planning a deploy: create, update in place, replace, delete, no change; prune touches only
file-made objects; every step is valid when it runs; export -> deploy is no change."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Dict, List

import pytest
from deploy_helpers import project, running_as  # noqa: F401 (project is a fixture)

from servekit._private.deploy.apply import DeployStepError, apply_plan
from servekit._private.deploy.definition import load_definitions
from servekit._private.deploy.export import export_config
from servekit._private.deploy.plan import Action, DeployPlan, Operation, make_plan
from servekit._private.deploy.schema import (
    DeployFileError,
    DeploySpec,
    load_deploy_file,
    parse_deploy_dict,
)
from servekit._private.deploy.state import RunningBackend, RunningEndpoint, RunningState
from servekit._private.deploy.undo import inverse
from servekit.config import BackendConfig


def file_data(**changes: Any) -> Dict[str, Any]:
    data: Dict[str, Any] = {
        "http_options": {"host": "127.0.0.1", "port": 8000},
        "backends": [
            {"name": "clf:v1", "import_path": "models:Classifier", "init_args": ["a"],
             "config": {"num_replicas": 2, "user_config": {"threshold": 0.5}}},
            {"name": "echo", "import_path": "models:echo"},
        ],
        "endpoints": [
            {"name": "clf", "route": "/clf", "methods": ["GET", "POST"],
             "traffic": {"clf:v1": 1.0}, "shadows": {"echo": 0.5}},
        ],
    }
    data.update(changes)
    return data


def spec_of(project: Path, data: Dict[str, Any]) -> DeploySpec:  # noqa: F811
    return parse_deploy_dict(data, str(project))


def plan_of(project: Path, data: Dict[str, Any], running: RunningState,  # noqa: F811
            prune: bool = False) -> DeployPlan:
    spec = spec_of(project, data)
    return make_plan(spec, load_definitions(spec), running, prune)


def deployed(project: Path, data: Dict[str, Any]) -> RunningState:  # noqa: F811
    spec = spec_of(project, data)
    return running_as(spec, load_definitions(spec), {"host": "127.0.0.1", "port": 8000})


def calls(plan: DeployPlan) -> List[tuple]:
    """The operations of a plan, backends by name."""
    return [(op.name, *(getattr(a, "spec", a) for a in op.args)) for op in plan.operations()]


def summary(plan: DeployPlan) -> List[tuple]:
    return [(step.action, step.kind, step.name) for step in plan.steps]


def test_an_empty_instance_gets_everything_created_backends_first(
        project: Path) -> None:  # noqa: F811
    plan = plan_of(project, file_data(), RunningState.empty())
    assert summary(plan) == [(Action.CREATE, "backend", "clf:v1"),
                             (Action.CREATE, "backend", "echo"),
                             (Action.CREATE, "endpoint", "clf")]
    names = [op.name for op in plan.operations()]
    assert names == ["create_backend", "create_backend", "create_endpoint", "shadow_traffic"]
    assert calls(plan)[2:] == [
        ("create_endpoint", "clf", "clf:v1", "/clf", ["GET", "POST"], "deploy"),
        ("shadow_traffic", "clf", "echo", 0.5)]
    created = plan.operations()[0].args[0]
    assert created.source["import_path"] == "models:Classifier"
    assert created.replica_config().source == created.source  # the mark


def test_the_same_file_again_changes_nothing(project: Path) -> None:  # noqa: F811
    plan = plan_of(project, file_data(), deployed(project, file_data()))
    assert not plan.changes_anything and plan.steps == ()
    assert str(plan).startswith("No change: the instance already runs what the spec")
    assert set(plan.unchanged) == {"backend clf:v1", "backend echo", "endpoint clf"}


def test_config_fields_are_updated_in_place(project: Path) -> None:  # noqa: F811
    running = deployed(project, file_data())
    data = file_data()
    data["backends"][0]["config"] = {"num_replicas": 3, "user_config": {"threshold": 0.5},
                                     "max_concurrent_queries": 4}
    plan = plan_of(project, data, running)
    assert summary(plan) == [(Action.UPDATE, "backend", "clf:v1")]
    assert calls(plan) == [("update_backend_config", "clf:v1",
                            {"num_replicas": 3, "max_concurrent_queries": 4})]
    assert "num_replicas 2 -> 3" in str(plan)


def test_a_field_left_out_goes_back_to_its_default(project: Path) -> None:  # noqa: F811
    running = deployed(project, file_data())
    data = file_data()
    data["backends"][0]["config"] = {"num_replicas": 2}
    assert calls(plan_of(project, data, running)) == [
        ("update_backend_config", "clf:v1", {"user_config": None})]


@pytest.mark.parametrize("field, value", [("init_args", ["b"]),
                                          ("ray_actor_options", {"num_cpus": 0.5}),
                                          ("import_path", "models.Classifier")])
def test_a_changed_definition_is_a_rolling_replacement(project: Path, field: str,  # noqa: F811
                                                       value: Any) -> None:
    running = deployed(project, file_data())
    data = file_data()
    data["backends"][0][field] = value
    plan = plan_of(project, data, running)
    assert summary(plan) == [(Action.REPLACE, "backend", "clf:v1")]
    assert [op.name for op in plan.operations()] == ["redeploy_backend"]
    assert field in str(plan) and "rolling replacement" in str(plan)


def test_edited_code_under_the_same_import_path_is_a_replacement(
        project: Path) -> None:  # noqa: F811
    running = deployed(project, file_data())
    models = project / "models.py"
    models.write_text(models.read_text() + "\n# edited\n")
    plan = plan_of(project, file_data(), running)
    assert {step.action for step in plan.steps} == {Action.REPLACE}
    assert "code changed" in str(plan)


def test_a_replacement_and_a_config_change_together(project: Path) -> None:  # noqa: F811
    running = deployed(project, file_data())
    data = file_data()
    data["backends"][0].update(init_args=["b"], config={"num_replicas": 1,
                                                         "user_config": {"threshold": 0.5}})
    assert [op.name for op in plan_of(project, data, running).operations()] == \
        ["redeploy_backend", "update_backend_config"]


def test_endpoint_changes_are_made_in_place(project: Path) -> None:  # noqa: F811
    running = deployed(project, file_data())
    data = file_data()
    data["endpoints"][0].update(route="/classify", methods=["POST"],
                                traffic={"clf:v1": 0.75, "echo": 0.25}, shadows={})
    plan = plan_of(project, data, running)
    assert calls(plan) == [("update_endpoint", "clf", "/classify", ["POST"], "deploy"),
                           ("set_traffic", "clf", {"clf:v1": 0.75, "echo": 0.25}),
                           ("shadow_traffic", "clf", "echo", 0.0)]


def test_without_prune_file_made_leftovers_are_kept_and_said(
        project: Path) -> None:  # noqa: F811
    running = deployed(project, file_data())
    data = file_data(endpoints=[])
    data["backends"] = data["backends"][:1]
    plan = plan_of(project, data, running)
    assert plan.steps == ()
    assert plan.kept == ("backend echo", "endpoint clf")
    assert "--prune deletes them" in str(plan)


def test_prune_deletes_endpoints_then_backends_but_nothing_made_through_the_api(
        project: Path) -> None:  # noqa: F811
    full = deployed(project, file_data())
    api_backend = RunningBackend("api", None, BackendConfig())
    api_endpoint = RunningEndpoint("api", "/api", ["GET"], {"api": 1.0}, {}, None)
    running = dataclasses.replace(
        full, backends={**full.backends, "api": api_backend},
        endpoints={**full.endpoints, "api": api_endpoint})
    data = file_data(endpoints=[])
    data["backends"] = data["backends"][:1]
    plan = plan_of(project, data, running, prune=True)
    assert summary(plan) == [(Action.DELETE, "endpoint", "clf"),
                             (Action.DELETE, "backend", "echo")]


def test_a_pruned_endpoint_whose_route_is_taken_is_deleted_first(
        project: Path) -> None:  # noqa: F811
    running = deployed(project, file_data())
    data = file_data()
    data["endpoints"][0]["name"] = "classify"  # a rename: same route, new name
    plan = plan_of(project, data, running, prune=True)
    assert summary(plan) == [(Action.DELETE, "endpoint", "clf"),
                             (Action.CREATE, "endpoint", "classify")]


def test_references_are_checked_before_anything_changes(project: Path) -> None:  # noqa: F811
    data = file_data()
    data["endpoints"][0]["traffic"] = {"nowhere": 1.0}
    with pytest.raises(DeployFileError) as caught:
        plan_of(project, data, RunningState.empty())
    assert caught.value.errors == [
        "endpoints[0].traffic.nowhere: backend 'nowhere' is neither in the file nor running; "
        "define it under backends, or check its spelling"]


def test_a_running_backend_may_be_named_and_a_pruned_one_may_not(
        project: Path) -> None:  # noqa: F811
    running = deployed(project, file_data())
    data = file_data()
    data["backends"] = data["backends"][:1]  # echo left the file, the shadow still names it
    assert plan_of(project, data, running).steps == ()
    with pytest.raises(DeployFileError, match=r"endpoints\[0\]\.shadows\.echo: backend "
                                              r"'echo' left the file and --prune deletes it"):
        plan_of(project, data, running, prune=True)


def test_a_pruned_backend_still_used_by_an_api_endpoint_is_refused(
        project: Path) -> None:  # noqa: F811
    full = deployed(project, file_data())
    api_endpoint = RunningEndpoint("api", "/api", ["GET"], {"echo": 1.0}, {}, None)
    running = dataclasses.replace(full, endpoints={**full.endpoints, "api": api_endpoint})
    data = file_data()
    data["backends"] = data["backends"][:1]
    data["endpoints"][0]["shadows"] = {}
    with pytest.raises(DeployFileError, match="endpoint.s. api still use it"):
        plan_of(project, data, running, prune=True)


def test_a_route_held_by_an_endpoint_outside_the_file_is_refused(
        project: Path) -> None:  # noqa: F811
    api_endpoint = RunningEndpoint("api", "/clf", ["GET"], {"x": 1.0}, {}, None)
    running = RunningState({"x": RunningBackend("x", None, BackendConfig())},
                           {"api": api_endpoint}, {})
    with pytest.raises(DeployFileError, match=r"endpoints\[0\]\.route: '/clf' is the route "
                                              r"of running endpoint 'api'"):
        plan_of(project, file_data(), running)


def test_different_http_options_are_refused_with_how_to_apply_them(
        project: Path) -> None:  # noqa: F811
    running = dataclasses.replace(deployed(project, file_data()),
                                  http={"host": "127.0.0.1", "port": 9000})
    with pytest.raises(DeployFileError, match=r"http_options: .*port is 9000, the file says "
                                              r"8000.*servekit shutdown --keep-state"):
        plan_of(project, file_data(), running)
    assert plan_of(project, file_data(http_options={"port": 0}), running).steps == ()
    running = dataclasses.replace(running, http={**running.http, "max_body_bytes": 1000})
    with pytest.raises(DeployFileError, match=r"max_body_bytes is 1000, the file says 2000"):
        plan_of(project, file_data(http_options={"port": 9000, "max_body_bytes": 2000}),
                running)


def test_backends_made_through_the_api_are_adopted_by_a_replacement(
        project: Path) -> None:  # noqa: F811
    running = deployed(project, file_data())
    adopted = dataclasses.replace(running.backends["echo"], source=None)
    running = dataclasses.replace(running, backends={**running.backends, "echo": adopted})
    plan = plan_of(project, file_data(), running)
    assert summary(plan) == [(Action.REPLACE, "backend", "echo")]
    assert "made through the Python API, now defined by the file" in str(plan)


def test_export_then_deploy_is_no_change(project: Path) -> None:  # noqa: F811
    full = deployed(project, file_data())
    api_backend = RunningBackend("api", None, BackendConfig())
    api_endpoint = RunningEndpoint("api", "/api", ["GET"], {"api": 1.0}, {}, None)
    uses_api = RunningEndpoint("mixed", "/mixed", ["GET"], {"echo": 1.0}, {"api": 0.1}, "deploy")
    running = dataclasses.replace(
        full, backends={**full.backends, "api": api_backend},
        endpoints={**full.endpoints, "api": api_endpoint, "mixed": uses_api})
    exported = export_config(running)
    assert exported.left_out == ["backend api (made through the Python API)",
                                 "endpoint api (made through the Python API)",
                                 "endpoint mixed (uses api, left out)"]
    text = exported.to_yaml()
    assert "#   backend api (made through the Python API)" in text
    path = project / "exported.yaml"
    path.write_text(text)
    spec = load_deploy_file(str(path))
    plan = make_plan(spec, load_definitions(spec), running)
    assert plan.steps == ()
    assert plan.kept == ("endpoint mixed",)  # file-made, but its shadow is not


def test_switching_to_autoscaling_is_an_update_in_place(project: Path) -> None:  # noqa: F811
    running = deployed(project, file_data())
    data = file_data()
    autoscaling = {"min_replicas": 1, "max_replicas": 3}
    data["backends"][0]["config"] = {"autoscaling_config": autoscaling,
                                     "user_config": {"threshold": 0.5}}
    (operation,) = plan_of(project, data, running).operations()
    assert operation.name == "update_backend_config"
    tag, update = operation.args
    assert set(update) == {"autoscaling_config"}
    merged = running.backends["clf:v1"].config.merged(update)
    assert merged.autoscaling_config is not None and merged.autoscaling_config.max_replicas == 3


class FailingClient:
    """Records the Client calls of an apply (and their arguments); the call named
    ``fail_on`` raises; ``replies`` answers controller calls by name."""

    def __init__(self, fail_on: str) -> None:
        self.fail_on = fail_on
        self.calls: List[str] = []
        self.args: List[tuple] = []
        self.replies: Dict[str, Any] = {}

    def __getattr__(self, name: str) -> Any:
        def call(*args: Any) -> Any:
            if name == "_call":
                name_called, args = args[0], args[1:]
                if name_called in self.replies:
                    return self.replies[name_called]
            else:
                name_called = name
            self.calls.append(name_called)
            self.args.append(args)
            if name_called == self.fail_on:
                raise ValueError("refused")
            return None
        return call


def test_an_apply_that_fails_half_way_undoes_what_it_changed(
        project: Path) -> None:  # noqa: F811
    running = deployed(project, file_data())
    data = file_data()
    data["backends"][0]["config"] = {"num_replicas": 3, "user_config": {"threshold": 0.5}}
    data["endpoints"][0]["traffic"] = {"clf:v1": 0.5, "echo": 0.5}
    plan = plan_of(project, data, running)
    client = FailingClient(fail_on="set_traffic")
    with pytest.raises(DeployStepError, match=r"endpoint clf: .* failed: ValueError: refused. "
                                              r"What the apply had changed before it was "
                                              r"undone"):
        apply_plan(client, plan)  # type: ignore[arg-type]
    assert client.calls == ["update_backend_config", "set_traffic", "update_backend_config"]
    tag, update = client.args[-1]
    before = running.backends[tag].config
    assert before.merged(update) == before  # the config it had


def test_the_inverse_of_each_operation_puts_back_the_state_before(
        project: Path) -> None:  # noqa: F811
    running = deployed(project, file_data())
    endpoint = running.endpoints["clf"]  # traffic {"clf:v1": 1.0}, shadows {"echo": 0.5}
    client = FailingClient(fail_on="")
    client.replies["get_backend_definition"] = ("old definition", None)
    definitions = load_definitions(spec_of(project, file_data()))
    cases = [
        (Operation("create_backend", (definitions["echo"],)),
         [Operation("delete_backend", ("echo", True))]),
        (Operation("redeploy_backend", (definitions["echo"],)),
         [Operation("restore_backend", ("echo", "old definition", None))]),
        (Operation("update_backend_config", ("echo", {"autoscaling_config": {}})),
         [Operation("update_backend_config",
                    ("echo", {"num_replicas": 1, "autoscaling_config": None}))]),
        (Operation("create_endpoint", ("new", "echo", "/new", ["GET"], "deploy")),
         [Operation("delete_endpoint", ("new",))]),
        (Operation("set_traffic", ("new", {"echo": 1.0})), []),  # deleting "new" undoes it
        (Operation("set_traffic", ("clf", {"echo": 1.0})),
         [Operation("set_traffic", ("clf", {"clf:v1": 1.0}))]),
        (Operation("shadow_traffic", ("clf", "echo", 0.0)),
         [Operation("shadow_traffic", ("clf", "echo", 0.5))]),
        (Operation("delete_endpoint", ("clf",)), [
            Operation("create_endpoint", ("clf", "clf:v1", endpoint.route, endpoint.methods,
                                          "deploy")),
            Operation("set_traffic", ("clf", {"clf:v1": 1.0})),
            Operation("shadow_traffic", ("clf", "echo", 0.5))]),
        (Operation("delete_backend", ("echo",)), []),  # cannot be undone: deleted last
    ]
    for operation, expected in cases:
        assert inverse(operation, running, client) == expected, operation  # type: ignore


# ------------------------------------------- what changed: per backend, by its imports

def two_module_data(**changes: Any) -> Dict[str, Any]:
    """iris:v1 and iris:v2 run model.py; api runs api.py, which does not import it."""
    data: Dict[str, Any] = {
        "backends": [
            {"name": "iris:v1", "import_path": "model:Iris", "init_args": ["v1"]},
            {"name": "iris:v2", "import_path": "model:Iris", "init_args": ["v2"]},
            {"name": "api", "import_path": "api:Api"},
        ],
        "endpoints": [
            {"name": "iris", "route": "/iris", "traffic": {"iris:v1": 0.5, "iris:v2": 0.5}},
            {"name": "api", "route": "/api", "traffic": {"api": 1.0}},
        ],
    }
    data.update(changes)
    return data


@pytest.fixture
def two_modules(project: Path) -> Path:  # noqa: F811
    (project / "model.py").write_text("import weights\n\nclass Iris:\n"
                                      "    def __init__(self, version):\n"
                                      "        self.version = version\n\n"
                                      "    def __call__(self, request):\n"
                                      "        return self.version\n")
    (project / "weights.py").write_text("W = 1\n")
    (project / "api.py").write_text("class Api:\n    def __call__(self, request):\n"
                                    "        return 'api'\n")
    return project


def test_a_subset_of_the_same_definitions_plans_no_change(two_modules: Path) -> None:
    running = deployed(two_modules, two_module_data())
    subset = two_module_data(backends=two_module_data()["backends"][:1],
                             endpoints=[{"name": "v1", "route": "/v1",
                                         "traffic": {"iris:v1": 1.0}}])
    spec = dataclasses.replace(spec_of(two_modules, subset), name="subset")
    plan = make_plan(spec, load_definitions(spec), running)
    assert summary(plan) == [(Action.CREATE, "endpoint", "v1")]
    assert plan.unchanged == ("backend iris:v1",)
    assert plan.kept == ()  # what the other file made is none of this one's business


def test_a_new_file_in_the_directory_plans_no_change(two_modules: Path) -> None:
    running = deployed(two_modules, two_module_data())
    (two_modules / "slow.py").write_text("import time\ntime.sleep(0)\n")
    assert not plan_of(two_modules, two_module_data(), running).changes_anything


def test_an_edited_module_replaces_exactly_the_backends_that_import_it(
        two_modules: Path) -> None:
    running = deployed(two_modules, two_module_data())
    (two_modules / "weights.py").write_text("W = 2\n")  # imported by model.py
    plan = plan_of(two_modules, two_module_data(), running)
    assert summary(plan) == [(Action.REPLACE, "backend", "iris:v1"),
                             (Action.REPLACE, "backend", "iris:v2")]
    assert "code changed: weights.py (edited) (rolling replacement)" in str(plan)
    assert "backend api" in plan.unchanged


def test_prune_deletes_only_what_the_files_name_made(two_modules: Path) -> None:
    ours = deployed(two_modules, two_module_data())
    theirs_spec = dataclasses.replace(
        spec_of(two_modules, two_module_data(backends=two_module_data()["backends"][2:],
                                             endpoints=two_module_data()["endpoints"][1:])),
        name="theirs")
    theirs = running_as(theirs_spec, load_definitions(theirs_spec))
    running = dataclasses.replace(theirs, backends={**theirs.backends,
                                                    **{k: v for k, v in ours.backends.items()
                                                       if k != "api"}},
                                  endpoints={**theirs.endpoints, "iris": ours.endpoints["iris"]})
    plan = plan_of(two_modules, two_module_data(backends=[], endpoints=[]), running,
                   prune=True)
    assert summary(plan) == [(Action.DELETE, "endpoint", "iris"),
                             (Action.DELETE, "backend", "iris:v1"),
                             (Action.DELETE, "backend", "iris:v2")]


def test_an_endpoint_a_backend_gets_a_handle_to_is_created_before_it(
        two_modules: Path) -> None:
    (two_modules / "compose.py").write_text(
        "import servekit as serve\n\nclass Composer:\n    def __init__(self):\n"
        "        self.iris = serve.connect().get_handle('iris')\n\n"
        "    def __call__(self, request):\n        return self.iris.remote().result()\n")
    data = two_module_data()
    data["backends"].insert(0, {"name": "composer", "import_path": "compose:Composer"})
    data["endpoints"].append({"name": "composer", "route": "/c",
                              "traffic": {"composer": 1.0}})
    plan = plan_of(two_modules, data, RunningState.empty())
    assert summary(plan) == [(Action.CREATE, "backend", "iris:v1"),
                             (Action.CREATE, "backend", "iris:v2"),
                             (Action.CREATE, "backend", "api"),
                             (Action.CREATE, "endpoint", "iris"),
                             (Action.CREATE, "backend", "composer"),
                             (Action.CREATE, "endpoint", "api"),
                             (Action.CREATE, "endpoint", "composer")]


def test_an_endpoint_named_in_a_backends_init_args_is_created_before_it(
        two_modules: Path) -> None:
    (two_modules / "compose.py").write_text(
        "import servekit as serve\n\nclass Composer:\n    def __init__(self, model):\n"
        "        self.model = serve.connect().get_handle(model)\n")
    data = two_module_data()
    data["backends"].insert(0, {"name": "composer", "import_path": "compose:Composer",
                                "init_args": ["api"]})
    data["endpoints"].append({"name": "composer", "route": "/c",
                              "traffic": {"composer": 1.0}})
    steps = summary(plan_of(two_modules, data, RunningState.empty()))
    assert steps.index((Action.CREATE, "endpoint", "api")) < \
        steps.index((Action.CREATE, "backend", "composer"))
