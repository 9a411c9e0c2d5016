"""Tunable knobs, each read once from the environment through a validating getter."""

from __future__ import annotations

import os


def _env_float(name: str, default: float, minimum: float = 0.0) -> float:
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"Environment variable {name}={raw!r} is not a number.") from None
    if value < minimum:
        raise ValueError(f"Environment variable {name}={raw!r} must be >= {minimum}.")
    return value


def _env_int(name: str, default: int, minimum: int = 1) -> int:
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"Environment variable {name}={raw!r} is not an integer.") from None
    if value < minimum:
        raise ValueError(f"Environment variable {name}={raw!r} must be >= {minimum}.")
    return value


def _env_choice(name: str, default: str, choices: tuple) -> str:
    raw = os.environ.get(name)
    if raw is None:
        return default
    if raw.upper() not in choices:
        raise ValueError(f"Environment variable {name}={raw!r} must be one of "
                         f"{', '.join(choices)} (in any case).")
    return raw.upper()


# Seconds `serve.start` waits for the controller and HTTP proxy to come up.
STARTUP_TIMEOUT_S = _env_float("SERVEKIT_STARTUP_TIMEOUT_S", 60.0)
# Seconds between the controller's health checks of its child processes.
HEALTH_CHECK_PERIOD_S = _env_float("SERVEKIT_HEALTH_CHECK_PERIOD_S", 0.5, minimum=0.01)
# Seconds the controller has to answer each of the supervisor's pings; after three missed
# in a row (its event loop is blocked, or it is stopped) it is killed and started again.
CONTROLLER_PING_TIMEOUT_S = _env_float("SERVEKIT_CONTROLLER_PING_TIMEOUT_S", 5.0,
                                       minimum=0.01)
# Seconds a process gets to exit after SIGTERM before it is killed.
PROCESS_STOP_TIMEOUT_S = _env_float("SERVEKIT_PROCESS_STOP_TIMEOUT_S", 5.0)
# Longest wait, in seconds, before retrying a replacement replica that failed to start.
MAX_RESTART_BACKOFF_S = _env_float("SERVEKIT_MAX_RESTART_BACKOFF_S", 30.0)
# Seconds `client.shutdown()` waits for the controller to stop everything.
SHUTDOWN_TIMEOUT_S = _env_float("SERVEKIT_SHUTDOWN_TIMEOUT_S", 30.0)
# Seconds a request to a just-removed route waits for an endpoint to take that route again.
ROUTE_GRACE_S = _env_float("SERVEKIT_ROUTE_GRACE_S", 1.0)
# Seconds a request to an endpoint that does not exist yet waits for it to be created.
MISSING_ENDPOINT_TIMEOUT_S = _env_float("SERVEKIT_MISSING_ENDPOINT_TIMEOUT_S", 30.0)
# Seconds the controller keeps the outcome of a finished goal for a client to wait on; a
# goal nobody waited on is forgotten after that.
GOAL_RETENTION_S = _env_float("SERVEKIT_GOAL_RETENTION_S", 600.0)
# Seconds a request waits in a router while its backend has no replica it can reach.
NO_REPLICA_TIMEOUT_S = _env_float("SERVEKIT_NO_REPLICA_TIMEOUT_S", 30.0)
# Seconds a proxy serves the same /-/metrics gathering to every scrape.
METRICS_CACHE_S = _env_float("SERVEKIT_METRICS_CACHE_S", 1.0, minimum=0.0)
# 1: /-/metrics also shows the metrics Ray Serve 2.x has under its names and labels (what its
# Grafana dashboards query); 0: servekit's names only (half the series to store).
RAY_METRIC_NAMES = bool(_env_int("SERVEKIT_RAY_METRIC_NAMES", 1, minimum=0))
# Seconds a TCP connection may take to open (TLS and authentication included).
CONNECT_TIMEOUT_S = _env_float("SERVEKIT_CONNECT_TIMEOUT_S", 10.0, minimum=0.1)
# Seconds of silence, with requests in flight, after which a TCP peer is pinged; silent for
# as long again, it is taken for gone and its requests fail.
PEER_PING_INTERVAL_S = _env_float("SERVEKIT_PEER_PING_INTERVAL_S", 5.0, minimum=0.01)
# Seconds a router waits before it tries again a replica it could not reach (a failed
# connect, a lost connection), doubled at each failure in a row up to the maximum: a replica
# that is healthy again is used again within that bound.
RECONNECT_BACKOFF_S = _env_float("SERVEKIT_RECONNECT_BACKOFF_S", 0.05, minimum=0.001)
MAX_RECONNECT_BACKOFF_S = _env_float("SERVEKIT_MAX_RECONNECT_BACKOFF_S", 2.0, minimum=0.001)
# Most replicas one backend may have (num_replicas, autoscaling max_replicas); a config
# asking for more is a validation error.
MAX_REPLICAS_PER_BACKEND = _env_int("SERVEKIT_MAX_REPLICAS_PER_BACKEND", 1000)
# Replicas of one backend whose start is under way at once; the next start as these end.
MAX_STARTING_REPLICAS = _env_int("SERVEKIT_MAX_STARTING_REPLICAS", 64)
# Directory where detached instances record their address.
SERVEKIT_HOME = os.path.expanduser(os.environ.get("SERVEKIT_HOME", "~/.servekit"))
# The level every process logs at (a logger of the user's code too).
LOG_LEVEL = _env_choice("SERVEKIT_LOG_LEVEL", "INFO",
                        ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"))
# How log lines are written: TEXT, or JSON (one object per line).
LOG_FORMAT = _env_choice("SERVEKIT_LOG_FORMAT", "TEXT", ("TEXT", "JSON")).lower()

# Long-poll keys: what routers, proxies and the controller agree on.
KEY_ENDPOINTS = "endpoints"
KEY_BACKENDS = "backends"
KEY_REPLICAS = "replicas"
KEY_MODELS = "models"  # {backend: {replica tag: multiplexed model ids it holds}}
# The HTTP server proxies run on unless HTTPOptions.server says: uvicorn or granian.
HTTP_SERVER = _env_choice("SERVEKIT_HTTP_SERVER", "UVICORN", ("UVICORN", "GRANIAN")).lower()
# Seconds the proxy waits for a client that stopped reading its response (the response
# cannot be written any further): past it the connection is closed and what the response
# streams is cancelled, so the replica's place comes back.
SEND_TIMEOUT_S = _env_float("SERVEKIT_SEND_TIMEOUT_S", 60.0, minimum=0.01)
# A request body may take the client timeout plus a second for every this many bytes (the
# time the proxy stopped reading it does not count): a client that trickles its body a
# byte at a time is answered 408 and closed (0: no such bound).
MIN_BODY_RATE = _env_float("SERVEKIT_MIN_BODY_RATE", 500.0)
