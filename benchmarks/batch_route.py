"""The numpy model of the ``batch_route`` benchmark scenario behind a FastAPI route, with
and without ``@serve.batch``, and the same model batched the 1.x way (``@accept_batch`` and
the backend's ``max_batch_size``). Imported by the replicas."""

from __future__ import annotations

import asyncio
from typing import Any, List

import numpy
from fastapi import FastAPI

import servekit as serve

BATCH = 16
app = FastAPI()


def weights() -> numpy.ndarray:
    return numpy.random.default_rng(0).standard_normal((1024, 1024))


def forward(weights: numpy.ndarray, xs: List[float]) -> List[float]:
    """One forward pass; like a GPU kernel it costs the same for 1 to 16 inputs (they are
    padded to a batch of 16), as the suite's ``batching`` scenario's model."""
    inputs = numpy.zeros((BATCH, weights.shape[0]))
    inputs[:len(xs)] = numpy.asarray(xs, dtype=float)[:, None]
    scores = numpy.tanh(inputs @ weights @ weights.T)
    return [float(row.sum()) for row in scores[:len(xs)]]


@serve.ingress(app)
class RouteModel:
    """``/batched/{x}`` goes through a ``@serve.batch`` method; ``/unbatched/{x}`` runs a
    pass per request. Both run the pass on a thread, so the loop keeps taking requests."""

    def __init__(self) -> None:
        self.weights = weights()

    @serve.batch(max_batch_size=BATCH, batch_wait_timeout_s=0.005)
    async def scores(self, xs: List[float]) -> List[float]:
        return await asyncio.to_thread(forward, self.weights, xs)

    @app.get("/batched/{x}")
    async def batched(self, x: float) -> float:
        return await self.scores(x)

    @app.get("/unbatched/{x}")
    async def unbatched(self, x: float) -> float:
        return (await asyncio.to_thread(forward, self.weights, [x]))[0]


class BackendWideModel:
    """The 1.x way: the backend's ``max_batch_size`` batches the HTTP requests."""

    def __init__(self) -> None:
        self.weights = weights()

    @serve.accept_batch
    def __call__(self, requests: List[Any]) -> List[float]:
        return forward(self.weights, [float(r.query_params["x"]) for r in requests])
