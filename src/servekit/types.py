"""Type aliases that servekit's signatures read from."""

from __future__ import annotations

from typing import Dict

BackendTag = str
EndpointTag = str
ReplicaTag = str
TrafficDict = Dict[BackendTag, float]
