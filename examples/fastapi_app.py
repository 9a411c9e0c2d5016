"""Serve FastAPI apps: a typed route and a WebSocket under a prefix, and a model class whose
routes reach the instance built in each replica, called over HTTP and through a handle.
Run: pip install "servekit[fastapi]" && python examples/fastapi_app.py
(or, from a clone: pip install -e ".[fastapi]")"""

import httpx
from fastapi_model import SentimentModel, shop  # a module: sent by reference, never pickled
from websockets.sync.client import connect

import servekit as serve

client = serve.start(http_options={"port": 8000})
client.create_backend("shop", shop)
client.create_endpoint("shop", backend="shop", route="/shop")  # /shop and all under it
client.create_backend("sentiment:v1", SentimentModel, ["good", "great", "happy"],
                      config={"num_replicas": 2})
client.create_endpoint("sentiment", backend="sentiment:v1", route="/sentiment")

with httpx.Client(base_url="http://127.0.0.1:8000", timeout=10) as http:
    order = {"item": "pen", "quantity": 3, "unit_price": 1.5}
    print("order:", http.post("/shop/orders", json=order).json())
    print("bad order:", http.post("/shop/orders", json={"item": "pen"}).status_code)
    print("docs at:", http.get("/shop/openapi.json").json()["servers"])
    print("prediction:", http.get("/sentiment/predict", params={"text": "a great day"}).json())

with connect("ws://127.0.0.1:8000/shop/echo") as websocket:
    replies = []
    for text in ("hello", "again"):
        websocket.send(text)
        replies.append(websocket.recv(timeout=10))
    print("websocket:", replies)

handle = client.get_handle("sentiment").options(method_name="classify")
print("handle:", handle.remote("a sad and rainy day").result(timeout=10))
client.shutdown()
