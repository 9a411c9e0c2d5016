"""ASGI apps and factories in an importable module, for test_asgi_app."""

from __future__ import annotations

from fastapi import FastAPI

import servekit as serve

app = FastAPI()


@app.get("/ping")
def ping() -> str:
    return "pong"


def create_app(greeting: str) -> FastAPI:
    built = FastAPI()

    @built.get("/hello")
    def hello() -> str:
        return greeting

    return built


@serve.asgi_factory
def decorated_create_app(greeting: str) -> FastAPI:
    return create_app(greeting)


def create_nothing() -> int:
    return 42
