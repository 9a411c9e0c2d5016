"""Model multiplexing on the Ray runtime: the header and handle options reach the replicas
over the TCP data plane, a model's requests stay on the replica that loaded it, and the
replicas' health pings report their models to ``Client.status()``."""

from __future__ import annotations

from typing import List, Optional

import httpx
import pytest
from multiplexed_backends import Models

from conftest import wait_for

pytestmark = pytest.mark.integration

RUNTIMES = [pytest.param("ray", marks=pytest.mark.ray)]
TIMEOUT = 60.0


def test_a_model_stays_on_the_replica_that_loaded_it_on_ray(serve_instance: tuple) -> None:
    client, url = serve_instance
    client.create_backend("models:v1", Models, config={"num_replicas": 2})
    client.create_endpoint("models", backend="models:v1", route="/models")
    answers = [httpx.get(f"{url}/models", headers={"serve_multiplexed_model_id": "m1"},
                         timeout=TIMEOUT).json() for _ in range(3)]
    handle = client.get_handle("models").options(multiplexed_model_id="m1")
    answers += [handle.remote().result(timeout=TIMEOUT) for _ in range(3)]
    assert {a["model"] for a in answers} == {"m1"}
    replica = answers[0]["replica"]
    assert {a["replica"] for a in answers[:3]} == {replica}
    assert answers[2]["loads"] == ["m1"]

    def held() -> Optional[List[str]]:
        return next((p["models"] for p in client.status()["processes"]
                     if p["name"] == replica and p["models"]), None)

    assert wait_for(held, timeout=TIMEOUT, message="status to show m1") == ["m1"]
