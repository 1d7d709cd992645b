"""Sampling parameters shared by every backend and command."""

import math
from dataclasses import dataclass
from typing import Dict, Optional

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
    """Temperature 0 (or below GREEDY_TEMPERATURE) is greedy. top_k 0, top_p 1 and min_p 0
    switch those filters off. Non-finite numbers are refused, not turned into empty text or noise.

    The logits processors are mlx-lm's (`make_logits_processors`), with its conventions: a
    penalty of 0 is off, each looks at the last `*_context_size` tokens of the history
    (prompt and generated tokens), `logit_bias` maps token ids to additive biases."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: Optional[int] = None
    min_p: float = 0.0
    min_tokens_to_keep: int = 1
    repetition_penalty: float = 0.0
    repetition_context_size: int = 20
    presence_penalty: float = 0.0
    presence_context_size: int = 20
    frequency_penalty: float = 0.0
    frequency_context_size: int = 20
    logit_bias: Optional[Dict[int, float]] = None

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
        for name in ("min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"):
            object.__setattr__(self, name, _finite(name, getattr(self, name)))
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.repetition_penalty < 0:
            raise ValueError(f"repetition_penalty must be >= 0, got {self.repetition_penalty}")
        # mlx-lm slices history[-size:]: a size of 0 would mean the whole history.
        sizes = ("min_tokens_to_keep", "repetition_context_size", "presence_context_size", "frequency_context_size")
        for name in sizes:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        object.__setattr__(self, "logit_bias", _logit_bias(self.logit_bias))

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE

    @property
    def has_processors(self) -> bool:
        """Whether any logits processor is on: each block position is then processed on its own."""
        return bool(self.logit_bias) or any(
            p != 0 for p in (self.repetition_penalty, self.presence_penalty, self.frequency_penalty)
        )


def _logit_bias(bias) -> Optional[Dict[int, float]]:
    """{token id: finite bias}; JSON's string keys ("42") are read as ids, as mlx_lm.server does."""
    if bias is None:
        return None
    if not isinstance(bias, dict):
        raise ValueError(f"logit_bias must map token ids to numbers, got {type(bias).__name__}")
    checked = {}
    for key, value in bias.items():
        try:
            token = int(key)
        except (TypeError, ValueError):
            raise ValueError(f"logit_bias keys must be token ids, got {key!r}")
        if isinstance(key, (bool, float)) or token < 0:
            raise ValueError(f"logit_bias keys must be token ids, got {key!r}")
        if isinstance(value, bool):
            raise ValueError(f"logit_bias[{key!r}] must be a finite number, got {value!r}")
        checked[token] = _finite(f"logit_bias[{key!r}]", value)
    return checked or None
