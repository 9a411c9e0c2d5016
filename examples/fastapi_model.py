"""The FastAPI side of examples/fastapi_app.py: a shop app with a typed route and a
WebSocket echo, and a model class whose routes reach the instance built in each replica.

They live in a module, not in the script: servekit sends a module's app or class by
reference (the replicas import this file), so nothing of them is pickled; one defined in a
script is pickled with its app, which works as long as everything it holds can be.
"""

from fastapi import FastAPI, WebSocket, WebSocketDisconnect
from pydantic import BaseModel

import servekit as serve

shop = FastAPI(title="shop")


class Order(BaseModel):
    item: str
    quantity: int
    unit_price: float


@shop.post("/orders")
def price(order: Order) -> dict:
    return {"item": order.item, "total": order.quantity * order.unit_price}


@shop.websocket("/echo")
async def echo(websocket: WebSocket) -> None:
    await websocket.accept()
    try:
        while True:
            await websocket.send_text("echo: " + await websocket.receive_text())
    except WebSocketDisconnect:
        pass


model_app = FastAPI(title="sentiment")


@serve.ingress(model_app)
class SentimentModel:
    """A toy model: counts happy words. Its routes get ``self``, the replica's instance."""

    def __init__(self, happy_words: list) -> None:
        self.happy_words = set(happy_words)  # stands for loading weights, once per replica

    def score(self, text: str) -> float:
        words = text.lower().split()
        return round(sum(word in self.happy_words for word in words) / max(len(words), 1), 3)

    @model_app.get("/predict")
    def predict(self, text: str) -> dict:
        return {"text": text, "score": self.score(text)}

    def classify(self, request) -> dict:
        """Not a route: for handles, which call it with a request, as any class backend."""
        return {"text": request.data, "positive": self.score(request.data) > 0}
