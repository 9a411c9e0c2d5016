"""Deploy files and the development loop, with real processes and real HTTP.

The ``servekit`` command runs in subprocesses against a detached instance in a private
``$SERVEKIT_HOME``; ``servekit deploy`` starts it (no instance runs at first). Each test
deploys the base file first, so tests do not depend on each other's leftovers.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any, Dict, Iterator, List

import httpx
import pytest
import yaml
from processes import descendants, kill_leftovers, snapshot, still_alive

import servekit as serve
from conftest import free_port, wait_for
from servekit._private import constants

pytestmark = pytest.mark.integration

MODELS = textwrap.dedent("""
    class Greeter:
        def __init__(self, greeting="hello"):
            if greeting == "corrupt":
                raise RuntimeError("the weights are corrupt")
            self.greeting = greeting

        def __call__(self, request):
            return self.greeting
""")


class Project:
    """A directory with ``models.py`` and deploy files, and the ``servekit`` command run in
    it with a private home."""

    def __init__(self, directory: Path, home: Path, port: int) -> None:
        self.directory = directory
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.env = {**os.environ, "SERVEKIT_HOME": str(home)}
        (directory / "models.py").write_text(MODELS)

    def file(self, name: str = "deploy.yaml", greeting: str = "hello", replicas: int = 1,
             extra: bool = False) -> str:
        """A deploy file: backend ``greet`` behind /greet (and, with ``extra``, backend
        ``extra`` behind /extra)."""
        data: Dict[str, Any] = {
            "http_options": {"host": "127.0.0.1", "port": self.port},
            "backends": [{"name": "greet", "import_path": "models:Greeter",
                          "init_args": [greeting], "config": {"num_replicas": replicas}}],
            "endpoints": [{"name": "greet", "route": "/greet", "methods": ["GET"],
                           "traffic": {"greet": 1.0}}],
        }
        if extra:
            data["backends"].append({"name": "extra", "import_path": "models:Greeter",
                                     "init_args": ["extra"]})
            data["endpoints"].append({"name": "extra", "route": "/extra",
                                      "traffic": {"extra": 1.0}})
        path = self.directory / name
        path.write_text(yaml.safe_dump(data))
        return str(path)

    def servekit(self, *args: str, ok: bool = True,
                 cwd: Path | str | None = None) -> subprocess.CompletedProcess:
        done = subprocess.run([sys.executable, "-m", "servekit.cli", *args],
                              cwd=cwd or self.directory, env=self.env, capture_output=True,
                              text=True, timeout=60)
        if ok:
            assert done.returncode == 0, done.stderr
        return done

    def prune_all(self, name: str) -> None:
        """Delete what the files named ``name`` made."""
        path = self.directory / f"{name}-nothing.yaml"
        path.write_text(yaml.safe_dump({"name": name}))
        self.servekit("deploy", "--prune", str(path))

    def status(self) -> Dict[str, Any]:
        return json.loads(self.servekit("status", "--json").stdout)

    def get(self, path: str) -> httpx.Response:
        return httpx.get(self.url + path, timeout=10)


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Project]:
    home = tmp_path_factory.mktemp("home")
    project = Project(tmp_path_factory.mktemp("project"), home, free_port())
    with pytest.MonkeyPatch.context() as patch:  # serve.connect() of this process finds it
        patch.setattr(constants, "SERVEKIT_HOME", str(home))
        first = project.servekit("deploy", project.file())
        try:
            assert "No servekit instance was running. Started a detached" in first.stdout
            yield project
        finally:
            project.servekit("shutdown", ok=False)


@pytest.fixture
def base(project: Project) -> Project:
    """The project's instance running the base file (and nothing the file made besides)."""
    project.servekit("deploy", "--prune", project.file())
    return project


def test_deploy_serves_and_the_same_file_again_changes_nothing(base: Project) -> None:
    assert base.get("/greet").text == "hello"
    again = base.servekit("deploy", base.file())
    assert again.stdout.startswith("No change: the instance already runs what")
    status = base.status()
    assert status["backends"]["greet"]["source"]["import_path"] == "models:Greeter"
    assert status["backends"]["greet"]["source"]["deploy"] == "deploy"
    assert status["endpoints"]["greet"]["managed"] == "deploy"  # the file's name


def replica_names(project: Project, backend: str) -> List[str]:
    return sorted(p["name"] for p in project.status()["processes"]
                  if p["role"] == "replica" and p["name"].startswith(backend + "#")
                  and p["state"] == "RUNNING")


def test_num_replicas_is_updated_in_place(base: Project) -> None:
    (before,) = replica_names(base, "greet")
    out = base.servekit("deploy", base.file(replicas=2)).stdout
    assert "update in place backend greet: num_replicas 1 -> 2" in out
    after = replica_names(base, "greet")
    assert len(after) == 2 and before in after  # the running replica was kept


def test_changed_init_args_roll_over_without_a_failed_request(base: Project) -> None:
    answers: List[Any] = []
    stop = threading.Event()

    def keep_asking() -> None:
        with httpx.Client(timeout=10) as http:
            while not stop.is_set():
                response = http.get(base.url + "/greet")
                answers.append(response.text if response.status_code == 200 else response)

    asker = threading.Thread(target=keep_asking)
    asker.start()
    try:
        wait_for(lambda: len(answers) > 5, message="requests before the deploy")
        out = base.servekit("deploy", base.file(greeting="bonjour")).stdout
        assert "replace         backend greet: init_args ['hello'] -> ['bonjour']" in out
        count = len(answers)
        wait_for(lambda: len(answers) > count + 5, message="requests after the deploy")
    finally:
        stop.set()
        asker.join()
    assert [a for a in answers if a not in ("hello", "bonjour")] == []
    assert answers[-1] == "bonjour"


def test_an_apply_that_fails_half_way_leaves_what_ran_before(base: Project) -> None:
    data = yaml.safe_load(Path(base.file()).read_text())
    data["backends"][0]["init_args"] = ["hola"]  # replaced first: this step works
    data["backends"].append({"name": "extra", "import_path": "models:Greeter",
                             "init_args": ["corrupt"]})  # its constructor raises
    path = base.directory / "half.yaml"
    path.write_text(yaml.safe_dump(data))
    failed = base.servekit("deploy", str(path), ok=False)
    assert failed.returncode == 1
    assert "the weights are corrupt" in failed.stderr
    assert "undone: the instance runs what it ran before" in failed.stderr
    assert base.get("/greet").text == "hello"  # the replacement was rolled back
    assert "extra" not in base.status()["backends"]
    assert base.servekit("deploy", base.file()).stdout.startswith("No change")


def test_dry_run_changes_nothing(base: Project) -> None:
    before = base.status()["backends"]
    out = base.servekit("deploy", "--dry-run", base.file(greeting="hi", extra=True)).stdout
    assert "create          backend extra" in out and "Dry run: nothing was changed." in out
    assert base.status()["backends"] == before
    assert base.get("/greet").text == "hello"


def test_prune_deletes_what_a_file_made_but_not_what_the_api_made(base: Project) -> None:
    client = serve.connect()
    client.create_backend("api", "models:Greeter", "api")
    client.create_endpoint("api", backend="api", route="/api")
    try:
        base.servekit("deploy", base.file(extra=True))
        assert base.get("/extra").text == "extra"
        kept = base.servekit("deploy", base.file()).stdout
        assert "backend extra, endpoint extra (made by a file named 'deploy', no longer in " \
            "this one" in kept
        assert base.get("/extra").status_code == 200
        plan = client.deploy(base.file(), prune=True)
        assert [(s.action.value, s.kind, s.name) for s in plan.steps] == [
            ("delete", "endpoint", "extra"), ("delete", "backend", "extra")]
        assert set(client.list_backends()) == {"greet", "api"}
        assert base.get("/extra").status_code == 404
        assert base.get("/api").text == "api"
    finally:
        client.delete_endpoint("api")
        client.delete_backend("api")


def test_a_file_with_an_error_changes_nothing(base: Project) -> None:
    before = base.status()
    path = Path(base.file(greeting="changed", replicas=2, extra=True))
    path.write_text(path.read_text().replace("extra: 1.0", "missing: 1.0"))
    done = base.servekit("deploy", str(path), ok=False)
    assert done.returncode == 1
    assert "endpoints[1].traffic.missing: backend 'missing' is neither in the file nor " \
           "running" in done.stderr
    after = base.status()
    assert (after["backends"], after["endpoints"]) == (before["backends"], before["endpoints"])
    assert base.get("/greet").text == "hello"


def test_config_round_trips(base: Project) -> None:
    client = serve.connect()
    client.create_backend("api", "models:Greeter", "api")
    try:
        exported = base.servekit("config")
        assert "#   backend api (made through the Python API)" in exported.stdout
        assert "left out" in exported.stderr
        path = base.directory / "exported.yaml"
        path.write_text(exported.stdout)
        again = base.servekit("deploy", str(path))
        assert again.stdout.startswith("No change"), again.stdout
    finally:
        client.delete_backend("api")


# ------------------------------------------------------------------ servekit run


def test_run_serves_reloads_survives_a_broken_reload_and_leaves_nothing(
        tmp_path: Path) -> None:
    project = Project(tmp_path, tmp_path / "home", free_port())
    deploy_file = project.file()
    run = subprocess.Popen([sys.executable, "-m", "servekit.cli", "run", deploy_file,
                            "--reload"], cwd=tmp_path, env=project.env, text=True,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    output: List[str] = []
    reader = threading.Thread(target=lambda: output.extend(iter(run.stdout.readline, "")),
                              daemon=True)  # type: ignore[union-attr]
    reader.start()
    processes: Dict[int, int] = {}
    try:
        def answer() -> str:
            try:
                response = project.get("/greet")
            except httpx.HTTPError:
                return ""
            return response.text if response.status_code == 200 else ""

        wait_for(lambda: answer() == "hello", timeout=30, message="the first deploy")
        processes = snapshot(descendants(run.pid))
        assert len(processes) >= 4  # supervisor, controller, proxy, replica
        models = tmp_path / "models.py"
        models.write_text(MODELS.replace("return self.greeting", "return self.greeting + '!'"))
        wait_for(lambda: answer() == "hello!", timeout=30, message="the reload")
        models.write_text(MODELS.replace("self.greeting = greeting", "raise RuntimeError('x')"))
        wait_for(lambda: any("Not applied" in line for line in output), timeout=30,
                 message="the broken reload to be reported")
        assert "RuntimeError" in "".join(output)
        assert answer() == "hello!"
        processes.update(snapshot(descendants(run.pid)))
        run.send_signal(signal.SIGINT)
        assert run.wait(timeout=30) == 0
        wait_for(lambda: not still_alive(processes), timeout=10,
                 message="every process of servekit run to end")
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
        kill_leftovers(processes)
        reader.join(timeout=10)
        run.stdout.close()  # type: ignore[union-attr]


# ----------------------------------------------- precise deploys, names, portability


def write_files(directory: Path, files: Dict[str, str]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (directory / name).write_text(textwrap.dedent(text))


def write_yaml(path: Path, data: Dict[str, Any]) -> str:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return str(path)


IRIS_PROJECT = {
    "model.py": """
        import weights

        class Iris:
            def __init__(self, version):
                self.version = version

            def __call__(self, request):
                return f"{self.version} {weights.W}"
    """,
    "weights.py": "W = 1\n",
    "api.py": """
        class Api:
            def __call__(self, request):
                return "api"
    """,
}


def test_only_what_changed_is_replaced(base: Project) -> None:
    directory = base.directory / "iris_project"
    write_files(directory, IRIS_PROJECT)
    full = write_yaml(directory / "full.yaml", {
        "backends": [{"name": "iris:v1", "import_path": "model:Iris", "init_args": ["v1"]},
                     {"name": "iris:v2", "import_path": "model:Iris", "init_args": ["v2"]},
                     {"name": "api2", "import_path": "api:Api"}],
        "endpoints": [{"name": "iris", "route": "/iris",
                       "traffic": {"iris:v1": 0.5, "iris:v2": 0.5}},
                      {"name": "api2", "route": "/api2", "traffic": {"api2": 1.0}}]})
    try:
        base.servekit("deploy", full)
        subset = write_yaml(directory / "subset.yaml", {"backends": [
            {"name": "iris:v1", "import_path": "model:Iris", "init_args": ["v1"]}]})
        out = base.servekit("deploy", subset).stdout
        assert out.startswith("No change"), out
        (directory / "slow.py").write_text("import time\n\ntime.sleep(0)\n")
        out = base.servekit("deploy", full).stdout
        assert out.startswith("No change"), out
        (directory / "slow.py").write_text("class Slow:\n    def __call__(self, request):\n"
                                           "        return 'slow'\n")
        with_slow = yaml.safe_load(Path(full).read_text())
        with_slow["backends"].append({"name": "slow", "import_path": "slow:Slow"})
        out = base.servekit("deploy", write_yaml(directory / "full.yaml", with_slow)).stdout
        assert out.startswith("Plan for") and "create          backend slow" in out, out
        assert "replace" not in out, out
        (directory / "weights.py").write_text("W = 2\n")  # imported by model.py only
        out = base.servekit("deploy", full).stdout
        assert "replace         backend iris:v1: code changed: weights.py (edited)" in out
        assert "replace         backend iris:v2: code changed: weights.py (edited)" in out
        assert "backend api2" in out.split("no change", 1)[1]
        assert "replace         backend api2" not in out
        assert base.get("/iris").text in ("v1 2", "v2 2")
    finally:
        base.prune_all("full")


def test_prune_deletes_only_what_files_of_its_name_made(base: Project) -> None:
    def team(letter: str) -> str:
        return write_yaml(base.directory / f"{letter}.yaml", {
            "name": f"team-{letter}",
            "backends": [{"name": f"team-{letter}", "import_path": "models:Greeter",
                          "init_args": [letter]}],
            "endpoints": [{"name": f"team-{letter}", "route": f"/team-{letter}",
                           "traffic": {f"team-{letter}": 1.0}}]})

    try:
        base.servekit("deploy", team("a"))
        base.servekit("deploy", team("b"))
        assert base.status()["endpoints"]["team-b"]["managed"] == "team-b"
        out = base.servekit("deploy", "--prune", base.file()).stdout  # "deploy" made neither
        assert "team-" not in out
        base.prune_all("team-a")
        assert base.get("/team-a").status_code == 404
        assert base.get("/team-b").text == "b"
        assert "team-a" not in base.status()["backends"]
    finally:
        base.prune_all("team-a")
        base.prune_all("team-b")


def test_a_bad_file_reports_all_its_problems_at_once(base: Project) -> None:
    write_files(base.directory, {"asgi.py": """
        async def app(scope, receive, send):
            pass
    """})
    before = base.status()
    bad = write_yaml(base.directory / "bad.yaml", {
        "http_optons": {"port": base.port},
        "backends": [
            {"name": "greet", "import_path": "models:Greeter", "init_args": ["a", "b"],
             "configs": {"num_replicas": 2}},
            {"name": "app", "import_path": "asgi:app", "config": {"num_replicas": -1}},
            {"name": "missing", "import_path": "nomodule:X"}],
        "endpoints": [{"name": "app", "route": "/app/", "traffic": {"app": 1.0}},
                      {"name": "greet", "route": "/greet", "traffic": {"gret": 1.0}}]})
    done = base.servekit("deploy", "--dry-run", bad, ok=False)
    assert done.returncode == 1
    for expected in ("http_optons: unknown key (did you mean 'http_options'?",
                     "backends[0].init_args: models:Greeter(greeting='hello') cannot take "
                     "['a', 'b']",
                     "backends[0].configs: unknown key (did you mean 'config'?",
                     "backends[1].config.num_replicas: Input should be greater than or equal "
                     "to 1",
                     "backends[2].import_path: cannot import 'nomodule:X'",
                     "endpoints[0].route: '/app/' ends with '/', but app is an ASGI app",
                     "endpoints[1].traffic.gret: backend 'gret' is neither in the file nor "
                     "running"):
        assert expected in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 7, done.stderr
    assert base.servekit("deploy", bad, ok=False).stderr == done.stderr  # the same, at once
    after = base.status()
    assert (after["backends"], after["endpoints"]) == (before["backends"], before["endpoints"])


def test_an_exported_file_deploys_from_another_directory(base: Project,
                                                         tmp_path: Path) -> None:
    exported = base.servekit("config").stdout
    data = yaml.safe_load(exported)
    assert data["working_dir"] == str(base.directory) and data["name"] == "deploy"
    path = tmp_path / "x.yaml"
    path.write_text(exported)
    out = base.servekit("deploy", str(path), cwd="/").stdout
    assert out.startswith("No change"), out
    data["backends"][0]["init_args"] = ["from elsewhere"]
    write_yaml(path, data)
    out = base.servekit("deploy", str(path), cwd="/").stdout
    assert "replace         backend greet: init_args" in out
    assert base.get("/greet").text == "from elsewhere"


COMPOSED = {
    "iris_model.py": """
        class IrisModel:
            def __call__(self, request):
                return "iris"
    """,
    "composer.py": """
        import servekit as serve

        class Composer:
            def __init__(self):
                # needs the endpoint now: the file creates it before this backend
                self.model = serve.connect().get_handle("iris-model")

            def __call__(self, request):
                return "composed " + self.model.remote().result(timeout=10)
    """,
}


def test_a_backend_gets_a_handle_to_an_endpoint_of_the_same_file(base: Project) -> None:
    directory = base.directory / "composed"
    write_files(directory, COMPOSED)
    path = write_yaml(directory / "composed.yaml", {
        "backends": [{"name": "composer", "import_path": "composer:Composer"},
                     {"name": "iris-model", "import_path": "iris_model:IrisModel"}],
        "endpoints": [{"name": "composed", "route": "/composed",
                       "traffic": {"composer": 1.0}},
                      {"name": "iris-model", "route": None, "traffic": {"iris-model": 1.0}}]})
    try:
        out = base.servekit("deploy", path).stdout
        assert out.index("create          endpoint iris-model") < \
            out.index("create          backend composer")
        assert base.get("/composed").text == "composed iris"
    finally:
        base.prune_all("composed")


def test_build_writes_the_deploy_file_a_function_describes(base: Project) -> None:
    write_files(base.directory, {"app.py": """
        from models import Greeter

        def build(client):
            client.create_backend("built", Greeter, "built")
            client.create_endpoint("built", backend="built", route="/built")
    """})
    done = base.servekit("build", "app:build", "-o", "out/built.yaml")
    assert "Wrote out/built.yaml" in done.stderr
    data = yaml.safe_load((base.directory / "out" / "built.yaml").read_text())
    assert data["working_dir"] == ".."
    assert data["backends"] == [{"name": "built", "import_path": "models:Greeter",
                                 "init_args": ["built"], "ray_actor_options": {},
                                 "config": {}}]
    try:
        base.servekit("deploy", str(base.directory / "out" / "built.yaml"), cwd="/")
        assert base.get("/built").text == "built"
    finally:
        base.prune_all("built")


def test_a_failed_first_deploy_leaves_no_instance(tmp_path: Path) -> None:
    project = Project(tmp_path, tmp_path / "home", free_port())
    done = project.servekit("deploy", project.file(greeting="corrupt"), ok=False)
    assert done.returncode == 1
    assert "the weights are corrupt" in done.stderr
    assert "the instance it started was shut down" in done.stderr
    status = project.servekit("status", ok=False)
    assert status.returncode == 1 and "no servekit instance" in status.stderr.lower()


def test_the_name_of_the_file_that_made_an_object_survives_a_restart(tmp_path: Path) -> None:
    project = Project(tmp_path, tmp_path / "home", free_port())
    for name in ("a", "b"):
        data = yaml.safe_load(Path(project.file(greeting=name)).read_text())
        data["name"] = f"team-{name}"
        data["backends"][0]["name"] = data["endpoints"][0]["name"] = name
        data["endpoints"][0]["route"] = f"/{name}"
        data["endpoints"][0]["traffic"] = {name: 1.0}
        project.servekit("deploy", write_yaml(tmp_path / f"{name}.yaml", data))
    try:
        exported = project.servekit("config").stdout
        assert "#   team-a: backend a, endpoint a" in exported
        assert "#   team-b: backend b, endpoint b" in exported
        project.servekit("shutdown", "--keep-state")
        project.servekit("start")
        project.prune_all("team-a")
        assert project.get("/a").status_code == 404
        assert project.get("/b").text == "b"
        assert yaml.safe_load(project.servekit("config").stdout)["name"] == "team-b"
    finally:
        project.servekit("shutdown", ok=False)
