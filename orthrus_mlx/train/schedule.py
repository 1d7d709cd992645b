"""Learning-rate schedule and the step/time budget shared by both training stages."""

from __future__ import annotations

import math
import time
from typing import Optional


def cosine_lr(step: int, progress: float, peak: float, warmup: int, floor: float = 0.1) -> float:
    """Linear warmup over `warmup` steps, times a cosine decay to floor * peak over progress 0..1."""
    warm = min(1.0, (step + 1) / max(warmup, 1))
    progress = min(max(progress, 0.0), 1.0)
    return peak * warm * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


class Budget:
    """Progress of a run limited by a step count and, optionally, by wall-clock minutes.

    A time budget keeps the run's length predictable on a shared, contended machine; the steps
    actually taken are reported so the run can be repeated exactly with a step budget.
    """

    def __init__(self, steps: int, minutes: Optional[float] = None):
        self.steps = steps
        self.seconds = minutes * 60 if minutes else None
        self.start = time.time()

    def elapsed(self) -> float:
        return time.time() - self.start

    def progress(self, step: int) -> float:
        p = step / self.steps
        if self.seconds:
            p = max(p, self.elapsed() / self.seconds)
        return p

    def done(self, step: int) -> bool:
        return self.progress(step) >= 1.0
