"""What a machine offers (CPUs, GPUs, custom resources) and what replicas ask for."""

from __future__ import annotations

import math
import os
import shutil
import subprocess
from typing import Dict, Iterable, List, Optional


def detect_gpus() -> List[str]:
    """GPU ids: from CUDA_VISIBLE_DEVICES when set, else from the NVIDIA driver, else none."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [d.strip() for d in visible.split(",") if d.strip() and d.strip() != "-1"]
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True,
                                 timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return []
    lines = [line for line in listing.stdout.splitlines() if line.startswith("GPU ")]
    return [str(i) for i in range(len(lines))]


def machine_capacity(gpus: List[str], custom: Optional[Dict[str, float]]) -> Dict[str, float]:
    return {"CPU": float(os.cpu_count() or 1), "GPU": float(len(gpus)), **(custom or {})}


def demand(actor_options: dict) -> Dict[str, float]:
    """Resources one replica reserves. Nothing unless asked: a replica reserves no CPU by
    default, so many small backends share a laptop; set num_cpus to stop oversubscription."""
    wanted = {"CPU": actor_options.get("num_cpus") or 0.0,
              "GPU": actor_options.get("num_gpus") or 0.0,
              **(actor_options.get("resources") or {})}
    return {name: float(amount) for name, amount in wanted.items() if amount}


def replicas_that_fit(capacity: Dict[str, float], used: Dict[str, float],
                      per_replica: Dict[str, float]) -> float:
    """How many more replicas asking ``per_replica`` fit next to ``used``."""
    fits = math.inf
    for name, amount in per_replica.items():
        free = capacity.get(name, 0.0) - used.get(name, 0.0)
        fits = min(fits, math.floor(max(free, 0.0) / amount + 1e-9))
    return fits


def add_up(demands: Iterable[Dict[str, float]]) -> Dict[str, float]:
    total: Dict[str, float] = {}
    for one in demands:
        for name, amount in one.items():
            total[name] = total.get(name, 0.0) + amount
    return total


class GPUAllocator:
    """Hands each replica with ``num_gpus`` its own devices (least used first)."""

    def __init__(self, gpus: List[str]) -> None:
        self._load: Dict[str, float] = {gpu: 0.0 for gpu in gpus}
        self._assigned: Dict[str, List[str]] = {}

    def assign(self, name: str, num_gpus: float) -> Optional[str]:
        """The CUDA_VISIBLE_DEVICES value for replica ``name``, or None if it wants none."""
        if not num_gpus or not self._load:
            return None
        count = min(math.ceil(num_gpus), len(self._load))
        chosen = sorted(self._load, key=lambda gpu: self._load[gpu])[:count]
        share = num_gpus / count
        for gpu in chosen:
            self._load[gpu] += share
        self._assigned[name] = chosen
        return ",".join(chosen)

    def devices(self, name: str) -> List[str]:
        """The GPUs replica ``name`` was given."""
        return list(self._assigned.get(name, ()))

    def restore(self, name: str, devices: List[str], num_gpus: float) -> None:
        """Count ``devices`` as replica ``name``'s again (adopted by a new controller);
        a device this machine no longer has is left out."""
        chosen = [gpu for gpu in devices if gpu in self._load]
        if not chosen:
            return
        for gpu in chosen:
            self._load[gpu] += num_gpus / len(chosen)
        self._assigned[name] = chosen

    def release(self, name: str, num_gpus: float) -> None:
        chosen = self._assigned.pop(name, [])
        for gpu in chosen:
            self._load[gpu] -= num_gpus / len(chosen)
