"""Validating a deploy file: every problem is reported, each naming its place and line."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import List

import pytest
from deploy_helpers import project  # noqa: F401 (a fixture)

from servekit._private.deploy.apply import plan_deploy
from servekit._private.deploy.definition import load_definitions
from servekit._private.deploy.schema import (
    DeployFileError,
    load_deploy_file,
    parse_deploy_dict,
    read_deploy_file,
)

GOOD = textwrap.dedent("""\
    http_options: {host: 127.0.0.1, port: 8000}
    backends:
      - name: "clf:v1"
        import_path: models:Classifier
        init_args: ["weights.bin"]
        ray_actor_options: {num_cpus: 1}
        config: {num_replicas: 2, user_config: {threshold: 0.5}}
    endpoints:
      - name: clf
        route: /clf
        methods: [post, GET]
        traffic: {"clf:v1": 1}
""")


def errors_of(tmp_path: Path, text: str) -> List[str]:
    path = tmp_path / "deploy.yaml"
    path.write_text(text)
    with pytest.raises(DeployFileError) as caught:
        load_deploy_file(str(path))
    return [error.replace(str(path), "FILE") for error in caught.value.errors]


def test_a_good_file_becomes_a_spec(tmp_path: Path) -> None:
    path = tmp_path / "deploy.yaml"
    path.write_text(GOOD)
    spec = load_deploy_file(str(path))
    assert spec.http_options == {"host": "127.0.0.1", "port": 8000}
    backend = spec.backends["clf:v1"]
    assert (backend.import_path, backend.init_args, backend.ray_actor_options) == \
        ("models:Classifier", ["weights.bin"], {"num_cpus": 1})
    assert backend.config.num_replicas == 2
    assert backend.config.user_config == {"threshold": 0.5}
    endpoint = spec.endpoints["clf"]
    assert (endpoint.route, endpoint.methods, endpoint.traffic, endpoint.shadows) == \
        ("/clf", ["GET", "POST"], {"clf:v1": 1.0}, {})
    assert spec.directory == str(tmp_path)


def test_every_error_names_its_place_and_line(tmp_path: Path) -> None:
    errors = errors_of(tmp_path, textwrap.dedent("""\
        http_options: {port: 70000}
        backends:
          - name: a
            import_path: models:Classifier
          - name: a
            import_path: models:Classifier
          - name: b
            import_path: models:Classifier
            ray_actor_options: {lifetime: detached}
          - name: c
            import_path: models:Classifier
            config:
              num_replicas: 0
              bogus: 1
        endpoints:
          - name: e
            route: nope
            traffic: {a: 0.5}
            shadows: {b: 2}
          - name: f
            traffic: {}
    """))
    assert errors == [
        "FILE:1: http_options.port: Input should be less than or equal to 65535",
        "FILE:5: backends[1].name: backend 'a' is already defined at backends[0]",
        "FILE:9: backends[2].ray_actor_options: ray_actor_options['lifetime'] cannot be set: "
        "servekit manages the 'lifetime' option of its replicas itself. Remove it.",
        "FILE:13: backends[3].config.num_replicas: Input should be greater than or equal to 1",
        "FILE:14: backends[3].config.bogus: unknown key (remove it, or check its spelling)",
        "FILE:17: endpoints[0].route: 'nope' must start with '/'",
        "FILE:18: endpoints[0].traffic: weights sum to 0.5, not 1",
        "FILE:19: endpoints[0].shadows.b: proportion 2.0 must be in (0, 1]; leave a shadow "
        "out to remove it",
        "FILE:21: endpoints[1].traffic: Dictionary should have at least 1 item after "
        "validation, not 0",
    ]


def test_structural_errors_name_their_place(tmp_path: Path) -> None:
    errors = errors_of(tmp_path, textwrap.dedent("""\
        backends:
          - name: a
            import_path: models:Classifier
            init_args: notalist
          - import_path: models:Classifier
        endpoints:
          - name: e
            traffic: {a: 1}
            rout: /e
    """))
    assert errors == [
        "FILE:4: backends[0].init_args: Input should be a valid list",
        "FILE:5: backends[1].name: missing (required)",
        "FILE:9: endpoints[0].rout: unknown key (did you mean 'route'? remove it, or check "
        "its spelling)",
    ]


def test_a_file_that_is_not_yaml_names_its_line(tmp_path: Path) -> None:
    errors = errors_of(tmp_path, "backends:\n  - name: [a\n")
    assert len(errors) == 1 and errors[0].startswith("FILE:3: not valid YAML")


def test_a_dict_is_validated_with_places_and_no_lines(tmp_path: Path) -> None:
    with pytest.raises(DeployFileError) as caught:
        parse_deploy_dict({"endpoints": [{"name": "e", "traffic": {"a": 1},
                                          "route": "/-/x"}]}, str(tmp_path))
    assert caught.value.errors == [
        "endpoints[0].route: '/-/x' is reserved: paths under /-/ are servekit's"]


def test_imports_and_config_are_checked_before_anything_runs(
        project: Path) -> None:  # noqa: F811
    spec = parse_deploy_dict({"backends": [
        {"name": "missing", "import_path": "nomodule:X"},
        {"name": "fn", "import_path": "models:echo", "init_args": [1]},
        {"name": "batch", "import_path": "models:Classifier",
         "config": {"max_batch_size": 4}},
        {"name": "fine", "import_path": "models:Classifier"},
    ]}, str(project))
    with pytest.raises(DeployFileError) as caught:
        load_definitions(spec)
    errors = caught.value.errors
    assert len(errors) == 3
    assert errors[0].startswith("backends[0].import_path: cannot import 'nomodule:X': "
                                "ImportError")
    assert errors[1] == ("backends[1].init_args: models:echo is a function: it takes no "
                         "init args (use a class, or an ASGI app factory, to take them)")
    assert errors[2].startswith("backends[2].config: max_batch_size is 4 but the backend's "
                                "callable does not accept batches")


def test_a_name_used_twice_is_reported_even_when_its_first_entry_is_invalid(
        tmp_path: Path) -> None:
    errors = errors_of(tmp_path, textwrap.dedent("""\
        backends:
          - name: x
            import_path: m:A
            config: {num_replicas: 0}
          - name: x
            import_path: m:B
    """))
    assert any("backends[0].config.num_replicas" in error for error in errors)
    assert "FILE:5: backends[1].name: backend 'x' is already defined at backends[0]" in errors


def test_two_projects_with_a_module_of_the_same_name_each_get_their_own(
        tmp_path: Path) -> None:
    for folder, name in (("one", "First"), ("two", "Second")):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "same_name_models.py").write_text(
            f"class {name}:\n    def __call__(self, request):\n        return 1\n")
    for folder, name in (("one", "First"), ("two", "Second")):
        spec = parse_deploy_dict({"backends": [
            {"name": "b", "import_path": f"same_name_models:{name}"}]},
            str(tmp_path / folder))
        assert load_definitions(spec)["b"].metadata.name == name


def test_a_bad_file_reports_every_problem_in_one_pass(project: Path) -> None:  # noqa: F811
    (project / "app.py").write_text(
        "async def app(scope, receive, send):\n    pass\n")
    path = project / "bad.yaml"
    path.write_text(textwrap.dedent("""\
        htp_options: {port: 8000}
        backends:
          - name: "clf:v1"
            import_path: models:Classifier
            init_args: [a, b]
            configs: {num_replicas: 2}
          - name: app
            import_path: app:app
            config: {num_replicas: 0}
          - name: gone
            import_path: nomodule:X
        endpoints:
          - name: app
            route: /app/
            traffic: {app: 1}
          - name: clf
            route: /clf
            traffic: {"clf:v2": 1}
    """))
    spec = read_deploy_file(str(path))
    with pytest.raises(DeployFileError) as caught:
        plan_deploy(None, spec)
    errors = [error.replace(str(path), "FILE") for error in caught.value.errors]
    assert errors[0] == ("FILE:1: htp_options: unknown key (did you mean 'http_options'? "
                         "remove it, or check its spelling)")
    assert errors[1].startswith("FILE:5: backends[0].init_args: models:Classifier(weights='w') "
                                "cannot take ['a', 'b']: too many positional arguments")
    assert errors[2] == ("FILE:6: backends[0].configs: unknown key (did you mean 'config'? "
                         "remove it, or check its spelling)")
    assert errors[3] == ("FILE:9: backends[1].config.num_replicas: Input should be greater "
                         "than or equal to 1")
    assert errors[4].startswith("FILE:11: backends[2].import_path: cannot import "
                                "'nomodule:X'")
    assert errors[5] == ("FILE:14: endpoints[0].route: '/app/' ends with '/', but app is an "
                         "ASGI app, whose route is a prefix holding the paths under it; use "
                         "'/app'")
    assert errors[6] == ("FILE:18: endpoints[1].traffic['clf:v2']: backend 'clf:v2' is neither "
                         "in the file nor running; define it under backends, or check its "
                         "spelling")
    assert len(errors) == 7


def test_every_problem_of_one_backend_is_reported(project: Path) -> None:  # noqa: F811
    spec = parse_deploy_dict({"backends": [
        {"name": "clf", "import_path": "models:Classifier", "init_args": [1, 2],
         "config": {"max_batch_size": 4}, "env": {"virtualenv": str(project / "no-venv")}},
    ]}, str(project))
    with pytest.raises(DeployFileError) as caught:
        load_definitions(spec)
    assert [error.partition(":")[0] for error in caught.value.errors] == [
        "backends[0].env", "backends[0].init_args", "backends[0].config"]
