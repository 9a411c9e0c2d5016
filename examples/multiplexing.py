"""Many models on a few replicas: a model per customer, loaded by id where requests need it.
Run: python examples/multiplexing.py"""

import asyncio
import concurrent.futures
import time

import httpx

import servekit as serve

URL = "http://127.0.0.1:8000/predict"


class Adapter:
    """A customer's model: here a scale factor; yours would be weights from a file."""

    def __init__(self, model_id):
        self.model_id = model_id
        self.scale = int(model_id.rsplit("-", 1)[1])

    def __call__(self, x):
        return self.scale * x

    async def aclose(self):
        pass  # called when the replica evicts it: free what it holds (GPU memory, files)


class Adapters:
    def __init__(self):
        self.loads = 0

    @serve.multiplexed(max_num_models_per_replica=2)
    async def get_model(self, model_id):
        await asyncio.sleep(0.1)  # stands for loading the weights
        self.loads += 1
        return Adapter(model_id)

    async def __call__(self, request):
        model = await self.get_model(serve.get_multiplexed_model_id())
        x = (await request.json())["x"]
        await asyncio.sleep(0.2)  # stands for 200 ms of inference
        return {"model": model.model_id, "y": model(x),
                "replica": serve.get_current_replica_tag(), "loads": self.loads}


client = serve.start(http_options={"port": 8000})
client.create_backend("adapters", Adapters,
                      config={"num_replicas": 2, "max_concurrent_queries": 2})
client.create_endpoint("adapters", backend="adapters", route="/predict", methods=["POST"])


def predict(model_id, x):
    response = httpx.post(URL, json={"x": x}, timeout=30,
                          headers={"serve_multiplexed_model_id": model_id})
    return response.json()


# One customer's requests go to the replica that loaded its model: loaded once.
answers = [predict("customer-1", x) for x in (1, 2, 3)]
print("HTTP:", {"model": answers[-1]["model"], "y": [a["y"] for a in answers]})
print("one replica, one load:", len({a["replica"] for a in answers}) == 1
      and answers[-1]["loads"] == 1)

handle = client.get_handle("adapters").options(multiplexed_model_id="customer-2",
                                               http_method="POST")
print("handle:", {k: v for k, v in handle.remote({"x": 5}).result().items()
                  if k in ("model", "y")})

# A hot model fills its replica's 2 places: the rest go to the other replica, which loads it.
with concurrent.futures.ThreadPoolExecutor(8) as pool:
    hot = list(pool.map(lambda x: predict("customer-7", x), range(8)))
print("hot model served by replicas:", len({a["replica"] for a in hot}))


def held():
    return [p["models"] for p in client.status()["processes"] if p["role"] == "replica"]


deadline = time.monotonic() + 10  # replicas report their models with each health ping
while sum("customer-7" in models for models in held()) < 2 and time.monotonic() < deadline:
    time.sleep(0.2)
print("replicas holding customer-7:", sum("customer-7" in models for models in held()))
print("at most 2 models per replica:", all(len(models) <= 2 for models in held()))
client.shutdown()
