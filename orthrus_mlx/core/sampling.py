"""Sampling parameters shared by every backend and command."""

import math
from dataclasses import dataclass
from typing import Optional

# Temperatures below this decode greedily: logits / temperature would leave only the top
# token anyway (a logit gap of 1e-4 already weighs e^-10), and would overflow float32 to
# inf, then NaN, well before temperature reaches 0.
GREEDY_TEMPERATURE = 1e-5
# Above this every token is about equally likely (logits span tens of units): uniform noise
# that no caller means to ask for, so it is refused like a non-finite value.
MAX_TEMPERATURE = 100.0


def _finite(name: str, value) -> float:
    # Stored as float: a Python int beyond int64 (a JSON 10**29) is not an MLX scalar.
    try:
        value = float(value)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value}")
    return value


@dataclass(frozen=True)
class SamplingParams:
    """Temperature 0 (or below GREEDY_TEMPERATURE) is greedy. top_k 0 and top_p 1 switch
    those filters off. Non-finite numbers are refused, not turned into empty text or noise."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: Optional[int] = None

    def __post_init__(self):
        object.__setattr__(self, "temperature", _finite("temperature", self.temperature))
        object.__setattr__(self, "top_p", _finite("top_p", self.top_p))
        if not 0 <= self.temperature <= MAX_TEMPERATURE:
            raise ValueError(f"temperature must be in [0, {MAX_TEMPERATURE:g}], got {self.temperature:g}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0, got {self.top_k}")
        if self.seed is not None and (
            not isinstance(self.seed, int) or isinstance(self.seed, bool) or not 0 <= self.seed < 2**64
        ):
            raise ValueError(f"seed must be an integer in [0, 2**64), got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE
