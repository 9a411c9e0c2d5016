"""A backend that follows its load: from zero replicas, up under a burst of requests, and
back to zero once they stop. Run: python examples/autoscaling.py"""

import asyncio
import concurrent.futures
import time

import httpx

import servekit as serve


async def slow_model(request):
    await asyncio.sleep(0.2)  # stands for 200 ms of inference
    return "done"


client = serve.start(http_options={"port": 8000})
client.create_backend("model", slow_model, config={"autoscaling_config": {
    "min_replicas": 0, "max_replicas": 4, "target_ongoing_requests": 2,
    "upscale_delay_s": 1, "downscale_delay_s": 2, "metrics_interval_s": 0.5,
    "look_back_period_s": 1}})
client.create_endpoint("model", backend="model", route="/model")


def replicas():
    return client.status()["backends"]["model"]["running"]


print("replicas at rest:", replicas())
print("first request:", httpx.get("http://127.0.0.1:8000/model", timeout=60).text)


def send(count):
    with httpx.Client(timeout=60) as http:
        return [http.get("http://127.0.0.1:8000/model").status_code for _ in range(count)]


# 8 clients at once: 8 requests in flight want 4 replicas at 2 each.
with concurrent.futures.ThreadPoolExecutor(8) as pool:
    burst = [pool.submit(send, 25) for _ in range(8)]
    most = 0
    while not all(future.done() for future in burst):
        most = max(most, replicas())
        time.sleep(0.2)
    codes = [code for future in burst for code in future.result()]
print("most replicas under load:", most)
print("failed requests:", sum(code != 200 for code in codes))

deadline = time.monotonic() + 30
while replicas() and time.monotonic() < deadline:
    time.sleep(0.5)
print("replicas after the load:", replicas())
client.shutdown()
