"""``servekit run module:function``: what a function declares becomes a deploy spec, and
edited code is a changed definition."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from deploy_helpers import project  # noqa: F401 (a fixture)

from servekit._private.deploy.definition import load_definitions
from servekit._private.deploy.recording import RecordingClient
from servekit._private.deploy.run import DevLoop
from servekit.env import CondaEnv
from servekit.exceptions import ServeError

APP = textwrap.dedent("""
    from models import Classifier

    def build(client):
        client.create_backend("clf:v1", Classifier, "a", config={"num_replicas": 2})
        client.create_backend("clf:v2", "models:Classifier", "b")
        client.update_backend_config("clf:v2", {"max_concurrent_queries": 3})
        client.create_endpoint("clf", backend="clf:v1", route="/clf", methods=["get"])
        client.set_traffic("clf", {"clf:v1": 0.5, "clf:v2": 0.5})
        client.shadow_traffic("clf", "clf:v2", 0.1)
""")


def test_a_function_declares_the_spec_a_file_would(project: Path,  # noqa: F811
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    (project / "app.py").write_text(APP)
    monkeypatch.chdir(project)
    spec = DevLoop("app:build", {"port": 8123}, print).spec()
    assert spec.http_options == {"port": 8123}
    v1, v2 = spec.backends["clf:v1"], spec.backends["clf:v2"]
    assert (v1.import_path, v1.init_args, v1.config.num_replicas) == \
        ("models:Classifier", ["a"], 2)
    assert (v2.init_args, v2.config.max_concurrent_queries) == (["b"], 3)
    endpoint = spec.endpoints["clf"]
    assert (endpoint.route, endpoint.methods, endpoint.traffic, endpoint.shadows) == \
        ("/clf", ["GET"], {"clf:v1": 0.5, "clf:v2": 0.5}, {"clf:v2": 0.1})


def test_edited_code_gives_a_new_revision(project: Path,  # noqa: F811
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    (project / "app.py").write_text(APP)
    monkeypatch.chdir(project)
    loop = DevLoop("app:build", {}, print)
    before = load_definitions(loop.spec())["clf:v1"].source["revision"]
    assert load_definitions(loop.spec())["clf:v1"].source["revision"] == before
    models = project / "models.py"
    models.write_text(models.read_text() + "\nEDITED = True\n")
    assert load_definitions(loop.spec())["clf:v1"].source["revision"] != before


def test_what_a_file_cannot_hold_is_refused_with_why() -> None:
    client = RecordingClient()

    class Local:
        pass

    with pytest.raises(TypeError, match="define the backend's function or class at the top "
                                        "level of a module"):
        client.create_backend("local", Local)
    with pytest.raises(TypeError, match="init args of backend 'x' must be plain data"):
        client.create_backend("x", "models:Classifier", object())
    client.create_backend("env", "models:Classifier", env=CondaEnv("base"))
    assert client.to_deploy_dict()["backends"][0]["env"] == {"conda": "base"}
    with pytest.raises(ServeError, match="Client.get_handle is not available"):
        client.get_handle("x")
