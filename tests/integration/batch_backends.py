"""Backends with ``@serve.batch`` methods the batching integration tests serve (imported by
the replicas, so nothing here is pickled)."""

from __future__ import annotations

import asyncio
import os
from typing import Any, AsyncIterator, List

from fastapi import FastAPI
from fastapi.responses import StreamingResponse
from robustness_backends import async_wait_for_file

import servekit as serve
from servekit.request import ServeRequest

scorer_app = FastAPI()


@serve.ingress(scorer_app)
class Scorer:
    """A FastAPI route and a handle method share one batched method, which records the
    size of each batch it ran."""

    def __init__(self) -> None:
        self.sizes: List[int] = []
        self.stream_sizes: List[int] = []

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.05)
    async def score(self, xs: List[int]) -> List[int]:
        self.sizes.append(len(xs))
        await asyncio.sleep(0.01)  # the model's work: callers gather meanwhile
        if -1 in xs:
            raise ValueError(f"cannot score a batch holding -1: {xs}")
        if -2 in xs:
            return xs[1:]
        return [x * 10 for x in xs]

    @scorer_app.get("/score/{x}")
    async def score_route(self, x: int) -> dict:
        return {"x": x, "score": await self.score(x)}

    async def score_one(self, request: ServeRequest) -> int:
        return await self.score(request.data)

    def batch_sizes(self, request: ServeRequest) -> List[int]:
        return self.sizes

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.05)
    async def tokens(self, prompts: List[str]) -> AsyncIterator[List[str]]:
        """Three tokens per prompt, one step of the batch at a time."""
        self.stream_sizes.append(len(prompts))
        for step in range(3):
            await asyncio.sleep(0.01)
            yield [f"{prompt}.{step} " for prompt in prompts]

    @scorer_app.get("/tokens/{prompt}")
    async def tokens_route(self, prompt: str) -> StreamingResponse:
        return StreamingResponse(self.tokens(prompt), media_type="text/plain")

    def stream_tokens(self, request: ServeRequest) -> AsyncIterator[str]:
        return self.tokens(request.data)

    def stream_batch_sizes(self, request: ServeRequest) -> List[int]:
        return self.stream_sizes

    def reconfigure(self, config: dict) -> None:
        self.score.set_max_batch_size(config["max_batch_size"])
        self.score.set_batch_wait_timeout_s(config["batch_wait_timeout_s"])


class Echo:
    """A plain class backend whose ``__call__`` is batched: HTTP requests in a list."""

    def __init__(self) -> None:
        self.sizes: List[int] = []

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.05)
    async def __call__(self, requests: List[Any]) -> List[str]:
        self.sizes.append(len(requests))
        return [f"{request.query_params['text']}!" for request in requests]

    def batch_sizes(self, request: ServeRequest) -> List[int]:
        return self.sizes


held_app = FastAPI()


@serve.ingress(held_app)
class Held:
    """One item per batch: notes it in the file ``ran`` of ``directory``, then holds the
    batch until the file ``release`` exists."""

    def __init__(self, directory: str) -> None:
        self.directory = directory

    @serve.batch(max_batch_size=1, batch_wait_timeout_s=0)
    async def run(self, items: List[str]) -> List[str]:
        with open(os.path.join(self.directory, "ran"), "a") as ran:  # noqa: ASYNC230 (a test)
            ran.write(f"{items[0]}\n")
        await async_wait_for_file(os.path.join(self.directory, "release"))
        return items

    @held_app.get("/run/{x}")
    async def run_route(self, x: str) -> str:
        return await self.run(x)

    def queued(self, request: ServeRequest) -> int:
        """How many items wait for a batch (the test looks inside the queue)."""
        queue = vars(self).get("_servekit_batch_queue_Held.run")
        return 0 if queue is None else len(queue._queue)
