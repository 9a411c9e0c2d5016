"""ASGI apps as backends: telling them apart, ``@ingress`` routes reaching ``self``,
factories, how a replica builds each kind, their metadata and how a client ships them."""

from __future__ import annotations

import sys
import threading
import types
import warnings
from typing import Annotated, Any, Iterator

import asgi_apps_for_tests
import cloudpickle
import pytest
from fastapi import Depends, FastAPI, WebSocket
from pydantic import BaseModel
from starlette.applications import Starlette
from starlette.exceptions import StarletteDeprecationWarning
from starlette.responses import PlainTextResponse
from starlette.routing import Route

import servekit as serve
from servekit._private.asgi_app import (
    ASGIFactory,
    LoadedApp,
    is_asgi_app,
    is_asgi_backend,
    load_app,
)
from servekit._private.backend_metadata import BackendMetadata
from servekit._private.config_checks import validate_backend_against_config
from servekit._private.import_path import import_path_of
from servekit.api import Client, _asgi_target
from servekit.config import BackendConfig

with warnings.catch_warnings():
    # starlette 1.x wants httpx2 for its test client and warns with httpx, which we use.
    warnings.simplefilter("ignore", StarletteDeprecationWarning)
    from starlette.testclient import TestClient


class Item(BaseModel):
    name: str
    count: int


class ItemOut(BaseModel):
    name: str


def doubled(value: int = 1) -> int:
    return 2 * value


def client(loaded: LoadedApp) -> TestClient:
    return TestClient(loaded.app)


async def raw_app(scope: Any, receive: Any, send: Any) -> None:
    await PlainTextResponse("raw")(scope, receive, send)


class CallableApp:
    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await PlainTextResponse("object")(scope, receive, send)


def make_ingress() -> tuple[FastAPI, type]:
    """A FastAPI app with a route of its own and an ``@ingress`` class with one route of
    each kind."""
    app = FastAPI()

    @app.get("/free")
    def free() -> str:
        return "free"

    @serve.ingress(app)
    class Model:
        def __init__(self, scale: int) -> None:
            self.scale = scale
            self.created: list[str] = []

        @app.get("/predict/{x}")
        def predict(self, x: int, offset: int = 0) -> dict:
            return {"y": x * self.scale + offset}

        @app.post("/items", status_code=201, response_model=ItemOut)
        async def create(self, item: Item) -> dict:
            self.created.append(item.name)
            return {"name": item.name * self.scale, "count": item.count}

        @app.get("/doubled")
        def with_dependency(self, value: Annotated[int, Depends(doubled)]) -> int:
            return value * self.scale

        @app.websocket("/echo")
        async def echo(self, websocket: WebSocket) -> None:
            await websocket.accept()
            await websocket.send_text(f"{await websocket.receive_text()} x{self.scale}")
            await websocket.close()

        @staticmethod
        @app.get("/static")
        def static() -> str:
            return "static"

        def helper(self, x: int) -> int:
            return x * self.scale

    return app, Model


@pytest.fixture
def model() -> Iterator[TestClient]:
    _, Model = make_ingress()
    with client(load_app(Model, (3,))) as http:
        yield http


# --- is_asgi_app -------------------------------------------------------------------------


@pytest.mark.parametrize("app", [FastAPI(), Starlette(), raw_app, CallableApp()],
                         ids=["fastapi", "starlette", "function", "object"])
def test_asgi_apps_are_recognized(app: Any) -> None:
    assert is_asgi_app(app)
    assert is_asgi_backend(app)


def sync_three(scope: Any, receive: Any, send: Any) -> None:
    return None


async def async_request(request: Any) -> str:
    return "ok"


@pytest.mark.parametrize("obj", [
    lambda request: request, async_request, sync_three, FastAPI, CallableApp, 42, "mod:app",
    ASGIFactory(asgi_apps_for_tests.create_app),
], ids=["1.x function", "1.x async function", "sync 3 args", "FastAPI class",
        "class with async call", "int", "string", "factory"])
def test_other_objects_are_not_asgi_apps(obj: Any) -> None:
    assert not is_asgi_app(obj)


# --- @ingress ----------------------------------------------------------------------------


def test_ingress_route_reaches_the_instance_with_path_and_query_params(model: TestClient
                                                                       ) -> None:
    assert model.get("/predict/2").json() == {"y": 6}
    assert model.get("/predict/2", params={"offset": 1}).json() == {"y": 7}
    assert model.get("/predict/two").status_code == 422


def test_ingress_route_takes_a_pydantic_body_and_keeps_status_and_response_model(
        model: TestClient) -> None:
    response = model.post("/items", json={"name": "ab", "count": 1})
    assert response.status_code == 201
    assert response.json() == {"name": "ababab"}  # response_model drops count


def test_ingress_route_rejects_an_invalid_body_with_fastapis_detail(model: TestClient) -> None:
    response = model.post("/items", json={"name": "ab"})
    assert response.status_code == 422
    [error] = response.json()["detail"]
    assert error["loc"] == ["body", "count"]
    assert error["type"] == "missing"


def test_ingress_route_gets_its_dependencies(model: TestClient) -> None:
    assert model.get("/doubled", params={"value": 5}).json() == 30


def test_ingress_websocket_route_reaches_the_instance(model: TestClient) -> None:
    with model.websocket_connect("/echo") as websocket:
        websocket.send_text("hi")
        assert websocket.receive_text() == "hi x3"


def test_other_routes_of_the_app_still_work(model: TestClient) -> None:
    assert model.get("/free").json() == "free"
    assert model.get("/static").json() == "static"


def test_openapi_does_not_list_self(model: TestClient) -> None:
    paths = model.get("/openapi.json").json()["paths"]
    assert [p["name"] for p in paths["/predict/{x}"]["get"]["parameters"]] == ["x", "offset"]
    assert "requestBody" in paths["/items"]["post"]
    assert [p["name"] for p in paths["/doubled"]["get"]["parameters"]] == ["value"]


def test_each_load_binds_its_own_instance() -> None:
    _, Model = make_ingress()
    loaded = load_app(Model, (3,))
    assert isinstance(loaded.instance, Model) and loaded.instance.scale == 3
    client(loaded).post("/items", json={"name": "a", "count": 1})
    assert loaded.instance.created == ["a"]
    again = load_app(Model, (5,))
    assert again.app is loaded.app
    assert client(again).get("/predict/1").json() == {"y": 5}


def test_methods_stay_plain_methods_for_handles() -> None:
    _, Model = make_ingress()
    instance = Model(4)
    assert instance.predict(2) == {"y": 8}
    assert instance.helper(2) == 8
    metadata = BackendMetadata.inspect(Model)
    assert metadata.is_class and metadata.asgi
    assert metadata.methods == ("create", "echo", "helper", "predict", "static",
                                "with_dependency")


def test_a_route_before_the_instance_exists_is_503() -> None:
    _, Model = make_ingress()
    response = TestClient(Model.__servekit_ingress__.app).get("/predict/1")
    assert response.status_code == 503
    assert "Model has no instance yet" in response.json()["detail"]


def test_class_routes_keep_their_place_before_later_routes() -> None:
    app = FastAPI()

    class Model:
        @app.get("/things/special")
        def special(self) -> str:
            return "special"

    @app.get("/things/{name}")
    def thing(name: str) -> str:
        return f"thing {name}"

    serve.ingress(app)(Model)  # after a route that matches the class's path too
    http = client(load_app(Model, ()))
    assert http.get("/things/special").json() == "special"
    assert http.get("/things/other").json() == "thing other"


def test_ingress_of_a_starlette_app_constructs_the_class() -> None:
    app = Starlette(routes=[Route("/", lambda request: PlainTextResponse("starlette"))])

    @serve.ingress(app)
    class Model:
        def __init__(self, value: int) -> None:
            self.value = value

    loaded = load_app(Model, (7,))
    assert loaded.app is app and loaded.instance.value == 7
    assert client(loaded).get("/").text == "starlette"


def test_ingress_of_something_else_than_an_app_names_it() -> None:
    with pytest.raises(TypeError, match=r"takes an ASGI app .*got 42 \(int\)"):
        serve.ingress(42)

    class Model:
        pass

    with pytest.raises(TypeError, match=r"got <class .*Model'> \(type\)"):
        serve.ingress(Model)  # @serve.ingress without (app)


def test_ingress_decorates_only_a_class_and_only_once() -> None:
    app = FastAPI()
    with pytest.raises(TypeError, match=r"decorates a class, got <function .*predict"):
        @serve.ingress(app)
        def predict(x: int) -> int:
            return x

    @serve.ingress(app)
    class Model:
        pass

    with pytest.raises(TypeError, match="Model is already decorated with @serve.ingress"):
        serve.ingress(app)(Model)


# --- factories and app objects -----------------------------------------------------------


def test_factory_from_a_function_builds_the_app_with_the_init_args() -> None:
    loaded = load_app(serve.asgi_factory(asgi_apps_for_tests.create_app), ("hi",))
    assert loaded.instance is None
    assert client(loaded).get("/hello").json() == "hi"


def test_factory_from_an_import_path() -> None:
    factory = serve.asgi_factory("asgi_apps_for_tests:create_app")
    assert client(load_app(factory, ("hey",))).get("/hello").json() == "hey"
    dotted = serve.asgi_factory("asgi_apps_for_tests.decorated_create_app")
    assert client(load_app(dotted, ("yo",))).get("/hello").json() == "yo"


def test_decorated_factory_can_still_be_called() -> None:
    factory = asgi_apps_for_tests.decorated_create_app
    assert isinstance(factory, ASGIFactory)
    assert TestClient(factory("direct")).get("/hello").json() == "direct"


def test_factory_pickles_and_works_after() -> None:
    for factory in (serve.asgi_factory(asgi_apps_for_tests.create_app),
                    serve.asgi_factory("asgi_apps_for_tests:create_app")):
        copy = cloudpickle.loads(cloudpickle.dumps(factory))
        assert client(load_app(copy, ("p",))).get("/hello").json() == "p"


def test_factory_returning_no_app_names_the_factory_and_the_result() -> None:
    factory = serve.asgi_factory(asgi_apps_for_tests.create_nothing)
    with pytest.raises(TypeError, match=r"factory create_nothing returned 42 \(int\), not an"):
        load_app(factory, ())


@pytest.mark.parametrize("value", [42, None, asgi_apps_for_tests.app])
def test_asgi_factory_wants_a_function_or_import_path(value: Any) -> None:
    with pytest.raises(TypeError, match="serve.asgi_factory takes"):
        serve.asgi_factory(value)


def test_an_app_object_is_used_as_it_is_and_takes_no_init_args() -> None:
    assert load_app(raw_app, ()) == LoadedApp(raw_app, None)
    with pytest.raises(ValueError, match=r"init args \(1,\) were given"):
        load_app(asgi_apps_for_tests.app, (1,))


def test_load_app_refuses_a_backend_that_is_no_asgi_app() -> None:
    with pytest.raises(TypeError, match="is not an ASGI backend"):
        load_app(async_request, ())


# --- metadata and config ----------------------------------------------------------------


@pytest.mark.parametrize("backend, name", [
    (FastAPI(), "FastAPI"), (Starlette(), "Starlette"), (raw_app, "raw_app"),
    (ASGIFactory(asgi_apps_for_tests.create_app), "create_app"),
    (ASGIFactory("asgi_apps_for_tests:create_app"), "asgi_apps_for_tests:create_app"),
])
def test_metadata_of_an_app_or_factory(backend: Any, name: str) -> None:
    metadata = BackendMetadata.inspect(backend)
    assert metadata.asgi is True
    assert (metadata.is_class, metadata.methods, metadata.accepts_batches) == (False, (), False)
    assert metadata.is_async is True
    assert metadata.name == name


def test_metadata_of_other_backends_is_not_asgi() -> None:
    class Model:
        def __call__(self, request: Any) -> str:
            return "ok"

    assert BackendMetadata.inspect(Model).asgi is False
    assert BackendMetadata.inspect(async_request).asgi is False


@pytest.mark.parametrize("config, message", [
    (BackendConfig(max_batch_size=4), "max_batch_size is 4 but the backend raw_app is an ASGI"),
    (BackendConfig(user_config={"a": 1}), "user_config is set but the backend raw_app is an "
                                          "ASGI app"),
])
def test_an_app_takes_neither_batches_nor_user_config(config: BackendConfig,
                                                      message: str) -> None:
    with pytest.raises(ValueError, match=message):
        validate_backend_against_config(BackendMetadata.inspect(raw_app), config)
    validate_backend_against_config(BackendMetadata.inspect(raw_app),
                                    BackendConfig(max_batch_size=1))


def test_an_ingress_class_with_reconfigure_takes_user_config() -> None:
    app = FastAPI()

    @serve.ingress(app)
    class WithReconfigure:
        def reconfigure(self, config: Any) -> None:
            pass

    @serve.ingress(app)
    class Without:
        pass

    config = BackendConfig(user_config={"a": 1})
    validate_backend_against_config(BackendMetadata.inspect(WithReconfigure), config)
    with pytest.raises(ValueError, match="class Without has no reconfigure"):
        validate_backend_against_config(BackendMetadata.inspect(Without), config)


# --- shipping: what create_backend sends --------------------------------------------------


def test_import_path_of_finds_a_module_global() -> None:
    assert import_path_of(asgi_apps_for_tests.app) == "asgi_apps_for_tests:app"
    assert import_path_of(object()) is None


def test_import_path_of_skips_the_script_and_modules_without_a_file(
        monkeypatch: pytest.MonkeyPatch) -> None:
    app = FastAPI()
    monkeypatch.setattr(sys.modules["__main__"], "the_app", app, raising=False)
    no_file = types.ModuleType("servekit_test_no_file")
    no_file.the_app = app  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "servekit_test_no_file", no_file)
    assert import_path_of(app) is None
    no_file.__file__ = "/somewhere/servekit_test_no_file.py"
    assert import_path_of(app) == "servekit_test_no_file:the_app"


def test_a_module_app_or_factory_is_sent_by_import_path() -> None:
    assert _asgi_target(asgi_apps_for_tests.app, ()) == ("asgi_apps_for_tests:app",) * 2
    decorated = asgi_apps_for_tests.decorated_create_app
    assert _asgi_target(decorated, ("x",)) == ("asgi_apps_for_tests:decorated_create_app",) * 2


def test_an_app_or_factory_no_module_holds_is_sent_itself() -> None:
    app = FastAPI()
    assert _asgi_target(app, ()) == (app, "FastAPI")
    factory = serve.asgi_factory(asgi_apps_for_tests.create_app)
    assert _asgi_target(factory, ("x",)) == (factory, "create_app")


def test_create_backend_refuses_init_args_with_an_app() -> None:
    with pytest.raises(ValueError, match="init args .* were given with an ASGI app"):
        Client("/nowhere").create_backend("b", asgi_apps_for_tests.app, 1)


def test_create_backend_says_how_to_ship_an_app_it_cannot_pickle() -> None:
    app = FastAPI()
    app.state.lock = threading.Lock()  # cannot be pickled
    with pytest.raises(TypeError, match=r"cannot be pickled: .*lock.*define it in a module .*"
                                        r"serve.asgi_factory\(create_app\)"):
        Client("/nowhere").create_backend("b", app)
