"""servekit on a multi-node Ray cluster (several raylets on this machine).

The session's cluster gets two worker nodes, each offering one unit of the custom resource
"worker", for this module; a test that removes a node adds a fresh one in its place.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from typing import Any, Dict, Iterator, List

import httpx
import pytest
from processes import start_time

import servekit as serve
from conftest import busy_port, free_port, ray_connected, wait_for

ray = pytest.importorskip("ray")

pytestmark = [pytest.mark.integration, pytest.mark.ray]

TIMEOUT = 30.0


def whoami(request: Any) -> dict:
    return {"replica": serve.get_current_replica_tag(),
            "node": ray.get_runtime_context().get_node_id()}


class Counter:
    def __init__(self) -> None:
        self.count = 0

    def __call__(self, request: Any) -> int:
        self.count += 1
        return self.count


@pytest.fixture(scope="module")
def cluster(ray_cluster: Any) -> Iterator[Any]:
    """The session's cluster with two worker nodes; this process is its driver meanwhile."""
    for _ in range(2):
        ray_cluster.add_node(num_cpus=1, resources={"worker": 1})
    ray_cluster.wait_for_nodes()
    with ray_connected(ray_cluster):
        yield ray_cluster
    # Every node this module added (tests add spares), so later modules find the head only.
    for node in list(ray_cluster.worker_nodes):
        ray_cluster.remove_node(node)


@pytest.fixture
def client(cluster: Any) -> Iterator[serve.Client]:
    client = serve.start(http_options={"port": 0, "location": "EveryNode"})
    yield client
    client.shutdown()


def processes(client: serve.Client, role: str) -> List[Dict[str, Any]]:
    return [p for p in client._call("status")["processes"] if p["role"] == role]


def live_nodes() -> set:
    return {node["NodeID"] for node in ray.nodes() if node["Alive"]}


def servekit_actors() -> List[str]:
    return sorted(actor["name"] for actor in ray.util.list_named_actors(all_namespaces=True)
                  if actor["namespace"] == "servekit")


def test_every_node_runs_a_proxy_that_answers(client: serve.Client) -> None:
    client.create_backend("who", whoami)
    client.create_endpoint("who", backend="who", route="/who")
    proxies = wait_for(lambda: (lambda found: found if len(found) == len(live_nodes())
                                else None)(processes(client, "proxy")),
                       TIMEOUT, "a proxy on every node")
    assert {p["node"] for p in proxies} == live_nodes()
    for proxy in proxies:
        host, port = proxy["http"]
        reply = httpx.get(f"http://{host}:{port}/who", timeout=TIMEOUT)
        assert reply.status_code == 200, reply.text
        assert reply.json()["replica"].startswith("who#")


def test_every_node_on_one_machine_shares_a_fixed_port(cluster: Any) -> None:
    """Several Ray nodes on one machine each run a proxy on the same fixed port (they bind it
    with SO_REUSEPORT). Old behaviour caught: the second failed with "Address already in
    use"."""
    port = free_port()
    client = serve.start(http_options={"port": port, "location": "EveryNode"})
    try:
        client.create_backend("who", whoami)
        client.create_endpoint("who", backend="who", route="/who")
        proxies = wait_for(lambda: (lambda found: found if len(found) == len(live_nodes())
                                    else None)(processes(client, "proxy")),
                           TIMEOUT, "a proxy on every node")
        assert len(proxies) >= 2 and {p["http"][1] for p in proxies} == {port}
        host = proxies[0]["http"][0]
        for _ in range(10):  # new connections, spread over the proxies by the kernel
            reply = httpx.get(f"http://{host}:{port}/who", timeout=TIMEOUT)
            assert reply.status_code == 200, reply.text
    finally:
        client.shutdown()


@pytest.mark.parametrize("location, proxies", [("HeadOnly", 1), ("NoServer", 0)])
def test_head_only_runs_one_proxy_on_the_driver_node_and_no_server_none(
        cluster: Any, location: str, proxies: int) -> None:
    client = serve.start(http_options={"port": 0, "location": location})
    try:
        client.create_backend("who", whoami, config={"num_replicas": 2})
        client.create_endpoint("who", backend="who", route="/who")  # waits for no other node
        found = processes(client, "proxy")
        assert len(found) == proxies
        if proxies:
            assert found[0]["node"] == ray.get_runtime_context().get_node_id()
            host, port = found[0]["http"]
            assert httpx.get(f"http://{host}:{port}/who", timeout=TIMEOUT).status_code == 200
        assert client.get_handle("who").remote().result(timeout=TIMEOUT)["replica"] \
            .startswith("who#")
    finally:
        client.shutdown()


def test_a_busy_http_port_is_a_serve_error_naming_it_and_leaves_no_actor(
        cluster: Any) -> None:
    with busy_port() as port, pytest.raises(serve.ServeError) as excinfo:
        serve.start(http_options={"port": port})
    message = str(excinfo.value)
    assert f"127.0.0.1:{port}" in message and "Address already in use" in message, message
    assert "Traceback" not in message and "actor_id" not in message, message
    wait_for(lambda: servekit_actors() == [], TIMEOUT, "no servekit actor left")


def test_replicas_are_placed_by_their_resources(cluster: Any, client: serve.Client) -> None:
    client.create_backend("spread", whoami, ray_actor_options={"resources": {"worker": 1}},
                          config={"num_replicas": 2})
    client.create_endpoint("spread", backend="spread")
    replicas = processes(client, "replica")
    worker_nodes = {node.node_id for node in cluster.worker_nodes}
    assert len(replicas) == 2
    # One unit of "worker" per worker node: one replica on each, none on the head.
    assert {r["node"] for r in replicas} == worker_nodes
    handle = client.get_handle("spread")
    seen = {handle.remote().result(timeout=TIMEOUT)["node"] for _ in range(40)}
    assert seen == worker_nodes


def test_a_removed_node_takes_its_replica_and_proxy_and_the_replica_is_replaced(
        cluster: Any, client: serve.Client) -> None:
    client.create_backend("spread", whoami, ray_actor_options={"resources": {"worker": 1}},
                          config={"num_replicas": 2})
    client.create_endpoint("spread", backend="spread", route="/spread")
    spare = cluster.add_node(num_cpus=1, resources={"worker": 1})
    cluster.wait_for_nodes()
    victim = next(node for node in cluster.worker_nodes if node is not spare and any(
        r["node"] == node.node_id for r in processes(client, "replica")))
    lost = {r["name"] for r in processes(client, "replica") if r["node"] == victim.node_id}
    cluster.remove_node(victim)

    def replaced() -> bool:
        replicas = processes(client, "replica")
        return len(replicas) == 2 and all(r["state"] == "RUNNING" for r in replicas) and \
            not lost & {r["name"] for r in replicas}

    wait_for(replaced, 60, "the lost replica replaced on the remaining nodes")
    assert spare.node_id in {r["node"] for r in processes(client, "replica")}
    wait_for(lambda: {p["node"] for p in processes(client, "proxy")} == live_nodes(), 60,
             "the proxies to follow the nodes")
    assert victim.node_id not in {p["node"] for p in processes(client, "proxy")}
    handle = client.get_handle("spread")
    assert all(handle.remote().result(timeout=TIMEOUT)["node"] != victim.node_id
               for _ in range(20))


def test_a_replica_actor_killed_with_ray_kill_is_replaced(client: serve.Client) -> None:
    client.create_backend("count", Counter)
    client.create_endpoint("count", backend="count")
    handle = client.get_handle("count")
    assert handle.remote().result(timeout=TIMEOUT) == 1
    [old] = processes(client, "replica")
    [actor_name] = [name for name in servekit_actors() if name.startswith("servekit:count#")]
    ray.kill(ray.get_actor(actor_name, namespace="servekit"), no_restart=True)
    wait_for(lambda: [r["name"] for r in processes(client, "replica")
                      if r["state"] == "RUNNING"] not in ([], [old["name"]]),
             TIMEOUT, "a new replica")
    assert handle.remote().result(timeout=TIMEOUT) == 1  # a fresh replica's first call


def test_the_controller_actor_killed_recovers_its_state_and_adopts_the_replicas(
        client: serve.Client) -> None:
    client.create_backend("count", Counter, config={"num_replicas": 2})
    client.create_endpoint("count", backend="count", route="/count")
    handle = client.get_handle("count")
    before = {r["name"]: r["pid"] for r in processes(client, "replica")}
    controller = ray.get_actor("servekit-controller", namespace="servekit")
    old_pid = client._call("status")["processes"][0]["pid"]
    ray.kill(controller, no_restart=False)  # Ray restarts it
    wait_for(lambda: start_time(old_pid) is None, TIMEOUT, "the controller's process to end")
    # Requests go on meanwhile, on the replicas the routers know.
    for _ in range(5):
        assert handle.remote().result(timeout=TIMEOUT) >= 1
    status = client._call("status")  # waits for the restarted controller
    assert status["processes"][0]["pid"] != old_pid
    assert {r["name"]: r["pid"] for r in processes(client, "replica")} == before
    assert list(client.list_backends()) == ["count"]
    assert client.list_endpoints()["count"]["route"] == "/count"
    client.update_backend_config("count", {"num_replicas": 1})
    assert len(processes(client, "replica")) == 1


def test_a_controller_restarted_at_a_new_address_is_found_again(
        client: serve.Client) -> None:
    """A controller that Ray restarts where its earlier port cannot be had (on another
    node, or, here, a port something else holds) serves on a new one. The proxies, the
    driver's routers and the client find it there, and it adopts every process."""
    from ray.experimental import internal_kv

    client.create_backend("who", whoami)
    client.create_endpoint("who", backend="who", route="/who")
    before = {p["name"]: p["pid"] for p in client._call("status")["processes"]
              if p["role"] in ("proxy", "replica")}
    [url, *_] = [f"http://{p['http'][0]}:{p['http'][1]}" for p in processes(client, "proxy")]
    old_pid = client._call("status")["processes"][0]["pid"]
    host = ray.util.get_node_ip_address()
    with socket.socket() as holder:  # bound, not listening: taken, and refusing
        holder.bind((host, 0))
        taken = f"tcp://{host}:{holder.getsockname()[1]}"
        internal_kv._internal_kv_put(b"controller_address", taken.encode(), overwrite=True,
                                     namespace="servekit")
        ray.kill(ray.get_actor("servekit-controller", namespace="servekit"),
                 no_restart=False)
        wait_for(lambda: start_time(old_pid) is None, TIMEOUT, "the old controller to end")
        wait_for(lambda: internal_kv._internal_kv_get(b"controller_address",
                                                      namespace="servekit") != taken.encode(),
                 TIMEOUT, "the restarted controller to record a new address")
        client.create_endpoint("who2", backend="who", route="/who2")  # the client follows

        def served_by_the_proxy() -> bool:
            return httpx.get(f"{url}/who2", timeout=TIMEOUT).status_code == 200

        wait_for(served_by_the_proxy, TIMEOUT, "the proxy to learn the new route")

        def served_by_a_handle() -> bool:
            try:
                return bool(client.get_handle("who2").remote().result(timeout=TIMEOUT))
            except serve.ServeError:  # EndpointNotFoundError until the router has it
                return False

        wait_for(served_by_a_handle, TIMEOUT, "the driver's router to learn the new route")
    after = {p["name"]: p["pid"] for p in client._call("status")["processes"]
             if p["role"] in ("proxy", "replica")}
    assert after == before


def test_detached_instance_is_reached_from_another_driver_and_shut_down(
        cluster: Any, tmp_path: Any) -> None:
    port = free_port()
    client = serve.start(detached=True, http_options={"port": port})
    try:
        client.create_backend("count", Counter)
        client.create_endpoint("count", backend="count", route="/count")
        script = tmp_path / "other_driver.py"
        script.write_text(textwrap.dedent(f"""
            import json, ray, servekit as serve
            ray.init(address={cluster.address!r}, logging_level="WARNING")
            client = serve.connect()
            handle = client.get_handle("count")
            print(json.dumps({{"backends": list(client.list_backends()),
                              "call": handle.remote().result(timeout=30)}}))
        """))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
        out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                             timeout=120, env=env)
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout.strip().splitlines()[-1]) == \
            {"backends": ["count"], "call": 1}
        status = subprocess.run(
            [sys.executable, "-m", "servekit.cli", "status", "--json", "--address",
             cluster.address], capture_output=True, text=True, timeout=120, env=env)
        assert status.returncode == 0, status.stderr
        assert list(json.loads(status.stdout)["backends"]) == ["count"]
        assert httpx.get(f"http://127.0.0.1:{port}/count", timeout=TIMEOUT).json() == 2
    finally:
        client.shutdown()
    wait_for(lambda: servekit_actors() == [], TIMEOUT, "every servekit actor gone")
    from ray.experimental import internal_kv

    assert internal_kv._internal_kv_list(b"", namespace="servekit") == []
    with pytest.raises(serve.ServeError, match="no instance running on this Ray cluster"):
        serve.connect()


def test_the_servekit_command_starts_and_shuts_down_a_ray_instance(cluster: Any) -> None:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}

    def servekit(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "servekit.cli", *args, "--address",
                               cluster.address], capture_output=True, text=True, timeout=120,
                              env=env)

    started = servekit("start", "--http-port", str(port))
    assert started.returncode == 0, started.stderr
    assert f"http://127.0.0.1:{port}" in started.stdout
    # The command's driver has exited; the detached instance serves on.
    assert httpx.get(f"http://127.0.0.1:{port}/-/healthz", timeout=TIMEOUT).text == "success"
    again = servekit("start")
    assert again.returncode == 1 and "already runs on this Ray cluster" in again.stderr
    stopped = servekit("shutdown")
    assert stopped.returncode == 0, stopped.stderr
    wait_for(lambda: servekit_actors() == [], TIMEOUT, "every servekit actor gone")
    missing = servekit("status")
    assert missing.returncode == 1
    assert "no servekit instance is running on this Ray cluster; start one with " \
        "'servekit start --address" in missing.stderr
