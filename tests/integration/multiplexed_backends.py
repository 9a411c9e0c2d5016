"""Backends with ``@serve.multiplexed`` loaders the multiplexing integration tests serve
(imported by the replicas, so nothing here is pickled). Their models are fakes that record
each load and cleanup of their replica."""

from __future__ import annotations

import asyncio
from typing import Any, Dict, List

from fastapi import FastAPI

import servekit as serve


class FakeModel:
    def __init__(self, model_id: str, closed: List[str]) -> None:
        self.model_id = model_id
        self._closed = closed

    async def aclose(self) -> None:
        self._closed.append(self.model_id)


class Models:
    """Loads fake models (``bad...`` ids fail to load); each answer tells which replica
    served it, with which model, and what that replica loaded and closed so far. A
    ``sleep`` argument holds the request that long after its model is loaded."""

    def __init__(self, load_s: float = 0.0) -> None:
        self.load_s = load_s
        self.loads: List[str] = []
        self.closed: List[str] = []

    @serve.multiplexed(max_num_models_per_replica=2)
    async def get_model(self, model_id: str) -> FakeModel:
        self.loads.append(model_id)
        await asyncio.sleep(self.load_s)
        if model_id.startswith("bad"):
            raise FileNotFoundError(f"no weights for model {model_id}")
        return FakeModel(model_id, self.closed)

    async def answer(self, sleep: float) -> Dict[str, Any]:
        model = await self.get_model(serve.get_multiplexed_model_id())
        await asyncio.sleep(sleep)
        return {"replica": serve.get_current_replica_tag(), "model": model.model_id,
                "loads": list(self.loads), "closed": list(self.closed)}

    async def __call__(self, request: Any) -> Dict[str, Any]:
        return await self.answer(float(request.query_params.get("sleep", 0)))


models_app = FastAPI()


@serve.ingress(models_app)
class ModelsApp(Models):
    """The same behind a FastAPI route."""

    @models_app.get("/predict")
    async def predict(self, sleep: float = 0.0) -> Dict[str, Any]:
        return await self.answer(sleep)


class BatchedModels(Models):
    """Batches its requests with ``@serve.batch``; each answer tells the model the batch
    ran with (loaded inside the batch) and the models its batch's requests named."""

    async def __call__(self, request: Any) -> Dict[str, Any]:
        return await self.predict((serve.get_multiplexed_model_id(),
                                   float(request.query_params.get("sleep", 0))))

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.2)
    async def predict(self, items: List[Any]) -> List[Dict[str, Any]]:
        model = await self.get_model(serve.get_multiplexed_model_id())
        await asyncio.sleep(max(sleep for _, sleep in items))
        named = sorted({model_id for model_id, _ in items})
        return [{"model": model.model_id, "batch_models": named, "batch_size": len(items)}
                for _ in items]
