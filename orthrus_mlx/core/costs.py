"""Measured cost of one decoding step against its block length, kept per machine and model.

The adaptive block policy needs to know what a step of L tokens costs here:
on Apple Silicon a 32-token pass of a quantized model can cost several
one-token passes, on other hardware almost nothing more. Attention over the
cache adds a part that grows with the context (on a CPU, for a small model,
it dominates long blocks). We time the real backend step (draft + verify +
the host sync + trim) at two context lengths, once, and keep a line per block
length: seconds = base[L] + per_position[L] * context. The policy treats these
as a prior and corrects them by the steps it times.

Where the lines are kept is the caller's choice (`CostStore`): in memory for the
process (the library's default), or also in a JSON file (the commands' choice,
`user_store()`), so that only a machine's first run measures. Backend-agnostic:
each backend names its own `cost_key`.
"""

import hashlib
import inspect
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

from .policy import AdaptiveBlock
from .sampling import SamplingParams
from .step import Backend

CALIBRATION_LENGTHS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
CONTEXTS = (64, 512)
CONTEXT = max(CONTEXTS)  # the cache a calibration backend must hold, besides one block
REPEATS = 7

# Settings that change kernel speed without changing the machine: a preloaded BLAS is ~40x
# faster than MLX's bundled one on Linux, and thread counts move small-matrix costs.
SPEED_ENVIRONMENT = ("LD_PRELOAD", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")

CostLines = Tuple[List[float], List[float]]


def machine_key(*parts: str) -> str:
    """A short hash of this machine plus whatever identifies the backend and model."""
    environment = [f"{name}={os.environ.get(name, '')}" for name in SPEED_ENVIRONMENT]
    everything = [platform.machine(), platform.processor(), platform.system(), *environment, *parts]
    return hashlib.sha256("|".join(everything).encode()).hexdigest()[:16]


def source_hash(*code: Any) -> str:
    """A hash of the source of the modules, classes or functions that run a step: a change to
    any of them may change what a step costs, so it must not reuse older measurements."""
    return hashlib.sha256("".join(inspect.getsource(c) for c in code).encode()).hexdigest()[:16]


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


def measure_cost_lines(make_backend: Callable[[], Backend], max_size: int) -> CostLines:
    """(base, per_position): a step of length L after S cached positions costs base[L] + per_position[L] * S."""
    backends = [make_backend(), make_backend()]
    room = backends[0].max_positions - max_size - 1  # a small model's context may be short
    s1 = min(CONTEXTS[1], room)
    s0 = min(CONTEXTS[0], s1 // 2)
    near, far = (measure_step_seconds(b, max_size, s) for b, s in zip(backends, (s0, s1)))
    per_position = [max(0.0, (b - a) / (s1 - s0)) for a, b in zip(near, far)]
    base = [a - slope * s0 for a, slope in zip(near, per_position)]
    return base, per_position


class CostStore:
    """Measured cost lines by cost key: in memory, and in a JSON file if given a `path`.

    `load` reads the file (done once when built), `save` writes it atomically, keeping
    entries other processes added meanwhile; `costs` saves after each new measurement,
    the only time the store changes, so a long-running server writes once at most.
    """

    def __init__(self, path: Optional[Path] = None):
        self.path = Path(path) if path is not None else None
        self.entries: Dict[str, dict] = {}
        self.load()

    def load(self) -> None:
        self.entries.update(self._read())

    def save(self) -> None:
        if self.path is None:
            return
        table = {**self._read(), **self.entries}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(table))
        tmp.replace(self.path)

    def _read(self) -> Dict[str, dict]:
        if self.path is None or not self.path.is_file():
            return {}
        try:
            table = json.loads(self.path.read_text())
        except json.JSONDecodeError:
            return {}  # a damaged file is measured again, then replaced
        return table if isinstance(table, dict) else {}

    def costs(self, key: str, max_size: int, measure: Callable[[], CostLines]) -> CostLines:
        """The (base, per_position) lines under `key` for lengths up to `max_size`, measured on first use."""
        if not self.has(key, max_size):
            # Otherwise a second or more of silence before the first token.
            print(f"orthrus-mlx: measuring what a step of 1..{max_size} tokens costs on this machine",
                  file=sys.stderr, flush=True)
            base, per_position = measure()
            self.entries[key] = {"base": base, "per_position": per_position}
            self.save()
        entry = self.entries[key]
        return entry["base"], entry["per_position"]

    def has(self, key: str, max_size: int) -> bool:
        """Whether lines for lengths up to `max_size` are kept under `key`."""
        entry = self.entries.get(key)
        return isinstance(entry, dict) and len(entry.get("base", [])) >= max_size + 1


# The library's default: measured once per process and model, written nowhere.
PROCESS_STORE = CostStore()


def user_store() -> CostStore:
    """The commands' store: $ORTHRUS_MLX_CACHE, else ~/.cache/orthrus-mlx."""
    root = os.environ.get("ORTHRUS_MLX_CACHE") or Path.home() / ".cache" / "orthrus-mlx"
    return CostStore(Path(root) / "step_costs.json")


def adaptive_policy(
    key: str, make_backend: Callable[[], Backend], max_size: int, store: Optional[CostStore] = None
) -> AdaptiveBlock:
    """A fresh adaptive policy over the step costs under `key` (measured with `make_backend`
    on first use, kept in `store`; the process's memory when None)."""
    store = store if store is not None else PROCESS_STORE
    measure = lambda: measure_cost_lines(make_backend, max_size)
    return AdaptiveBlock(max_size, *store.costs(key, max_size, measure))
