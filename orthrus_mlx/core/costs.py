"""Measured cost of one decoding step against its block length, cached per machine and model.

The adaptive block policy needs to know what a step of L tokens costs here:
on Apple Silicon a 32-token pass of a quantized model can cost several
one-token passes, on other hardware almost nothing more. Attention over the
cache adds a part that grows with the context (on a CPU, for a small model,
it dominates long blocks). We time the real backend step (draft + verify +
the host sync + trim) at two context lengths, once, and keep a line per block
length: seconds = base[L] + per_position[L] * context. The policy treats these
as a prior and corrects them by the steps it times; what it has learned
(acceptance, corrections) is kept beside them, so the next process resumes it.
Backend-agnostic: each backend names its own cache key.
"""

import hashlib
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Callable, Iterator, List, Tuple, Union

from .policy import AdaptiveBlock
from .sampling import SamplingParams
from .step import Backend

CALIBRATION_LENGTHS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
CONTEXTS = (64, 512)
CONTEXT = max(CONTEXTS)  # the cache a calibration backend must hold, besides one block
REPEATS = 7


def cache_file() -> Path:
    root = os.environ.get("ORTHRUS_MLX_CACHE") or Path.home() / ".cache" / "orthrus-mlx"
    return Path(root) / "step_costs.json"


# Settings that change kernel speed without changing the machine: a preloaded BLAS is ~40x
# faster than MLX's bundled one on Linux, and thread counts move small-matrix costs.
SPEED_ENVIRONMENT = ("LD_PRELOAD", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def machine_key(*parts: str) -> str:
    """A short hash of this machine plus whatever identifies the backend and model."""
    environment = [f"{name}={os.environ.get(name, '')}" for name in SPEED_ENVIRONMENT]
    everything = [platform.machine(), platform.processor(), platform.system(), *environment, *parts]
    return hashlib.sha256("|".join(everything).encode()).hexdigest()[:16]


def measure_step_seconds(backend: Backend, max_size: int, context: int) -> List[float]:
    """Seconds per step for L = 1..max_size (index 0 unused) after `context` cached
    positions, interpolated between measured L. The backend's cache must be empty."""
    greedy = SamplingParams()
    backend.prefill([1] * context, greedy)
    lengths = sorted({L for L in CALIBRATION_LENGTHS if L <= max_size} | {max_size})

    def step(L: int) -> float:
        tic = time.perf_counter()
        drafted = backend.draft(1, L, greedy) if L > 1 else None
        backend.verify(1, drafted, greedy)
        backend.trim(L)
        return time.perf_counter() - tic

    for L in lengths:
        step(L)  # warm-up: traces and compiles the passes for this length
    # Round-robin, so that a busy moment of the machine lands on every length alike.
    times = {L: [] for L in lengths}
    for _ in range(REPEATS):
        for L in lengths:
            times[L].append(step(L))
    measured = {L: sorted(t)[len(t) // 2] for L, t in times.items()}
    costs = [0.0]
    for n in range(1, max_size + 1):
        lo = max(L for L in lengths if L <= n)
        hi = min(L for L in lengths if L >= n)
        w = 0.0 if hi == lo else (n - lo) / (hi - lo)
        costs.append(measured[lo] * (1 - w) + measured[hi] * w)
    return costs


def measure_cost_lines(make_backend: Callable[[], Backend], max_size: int) -> Tuple[List[float], List[float]]:
    """(base, per_position): a step of length L after S cached positions costs base[L] + per_position[L] * S."""
    backends = [make_backend(), make_backend()]
    room = backends[0].max_positions - max_size - 1  # a small model's context may be short
    s1 = min(CONTEXTS[1], room)
    s0 = min(CONTEXTS[0], s1 // 2)
    near, far = (measure_step_seconds(b, max_size, s) for b, s in zip(backends, (s0, s1)))
    per_position = [max(0.0, (b - a) / (s1 - s0)) for a, b in zip(near, far)]
    base = [a - slope * s0 for a, slope in zip(near, per_position)]
    return base, per_position


def read_table() -> dict:
    path = cache_file()
    if path.is_file():
        try:
            table = json.loads(path.read_text())
            return table if isinstance(table, dict) else {}
        except json.JSONDecodeError:
            pass
    return {}


def write_entry(key: str, entry: dict) -> None:
    """Replace one key's entry; atomic, so a reader never sees half a file."""
    path = cache_file()
    table = read_table()
    table[key] = entry
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(table))
    tmp.replace(path)


def step_seconds(key: str, make_backend: Callable[[], Backend], max_size: int) -> Tuple[List[float], List[float]]:
    """The cached (base, per_position) cost lines under `key`, measured on first use."""
    entry = read_table().get(key)
    if not isinstance(entry, dict) or len(entry.get("base", [])) < max_size + 1:
        # Otherwise a second or more of silence before the first token.
        print(f"orthrus-mlx: measuring what a step of 1..{max_size} tokens costs on this machine",
              file=sys.stderr, flush=True)
        base, per_position = measure_cost_lines(make_backend, max_size)
        entry = {"base": base, "per_position": per_position}
        write_entry(key, entry)
    return entry["base"], entry["per_position"]


def adaptive_policy(key: str, weights: str, make_backend: Callable[[], Backend], max_size: int) -> AdaptiveBlock:
    """The adaptive policy over the step costs under `key`, resuming what earlier processes
    learned with these `weights` (a fingerprint: costs follow the shapes, acceptance the weights)."""
    policy = AdaptiveBlock(max_size, *step_seconds(key, make_backend, max_size))
    policy.cache_key = machine_key(key, weights)
    policy.restore(read_table().get(policy.cache_key, {}).get("learned", {}))
    return policy


def remembering(tokens: Iterator[int], policy: Union[int, AdaptiveBlock]) -> Iterator[int]:
    """`tokens` as they come; then, if `policy` is adaptive, what it learned is kept (also when
    the consumer stops early)."""
    try:
        yield from tokens
    finally:
        if isinstance(policy, AdaptiveBlock):
            remember(policy)


def remember(policy: AdaptiveBlock) -> None:
    """Keep what `policy` has learned next to its step costs, for the next process."""
    if policy.cache_key:
        write_entry(policy.cache_key, {"learned": policy.state()})
