"""Measured cost of one decoding step against its block length, cached per machine and model.

The adaptive block policy needs to know what a step of L tokens costs here:
on Apple Silicon a 32-token pass of a quantized model can cost several
one-token passes, on other hardware almost nothing more. We time the real
backend step (draft + verify + the host sync + trim) once and keep the curve.
Backend-agnostic: each backend names its own cache key.
"""

import hashlib
import json
import os
import platform
import time
from pathlib import Path
from typing import Callable, List

from .decode import Backend, SamplingParams

CALIBRATION_LENGTHS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
CONTEXT = 64
REPEATS = 5


def cache_file() -> Path:
    root = os.environ.get("ORTHRUS_MLX_CACHE") or Path.home() / ".cache" / "orthrus-mlx"
    return Path(root) / "step_costs.json"


def machine_key(*parts: str) -> str:
    """A short hash of this machine plus whatever identifies the backend and model."""
    everything = [platform.machine(), platform.processor(), platform.system(), *parts]
    return hashlib.sha256("|".join(everything).encode()).hexdigest()[:16]


def measure_step_seconds(backend: Backend, max_size: int) -> List[float]:
    """Seconds per step for L = 1..max_size (index 0 unused), interpolated between measured L."""
    greedy = SamplingParams()
    backend.prefill([1] * CONTEXT, greedy)
    lengths = sorted({L for L in CALIBRATION_LENGTHS if L <= max_size} | {max_size})
    measured = {}
    for L in lengths:
        times = []
        for _ in range(REPEATS + 1):  # the first run warms up
            tic = time.perf_counter()
            drafted = backend.draft(1, L, greedy) if L > 1 else None
            backend.verify(1, drafted, greedy)
            backend.trim(L)
            times.append(time.perf_counter() - tic)
        measured[L] = sorted(times[1:])[len(times[1:]) // 2]
    costs = [0.0]
    for n in range(1, max_size + 1):
        lo = max(L for L in lengths if L <= n)
        hi = min(L for L in lengths if L >= n)
        w = 0.0 if hi == lo else (n - lo) / (hi - lo)
        costs.append(measured[lo] * (1 - w) + measured[hi] * w)
    return costs


def step_seconds(key: str, make_backend: Callable[[], Backend], max_size: int) -> List[float]:
    """The cached cost curve under `key`, measured on a fresh backend on first use."""
    path = cache_file()
    table = {}
    if path.is_file():
        try:
            table = json.loads(path.read_text())
        except json.JSONDecodeError:
            table = {}
    costs = table.get(key)
    if costs is None or len(costs) < max_size + 1:
        costs = measure_step_seconds(make_backend(), max_size)
        table[key] = costs
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(table))
        tmp.replace(path)
    return costs
