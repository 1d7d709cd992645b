"""The Orthrus decoding step, written once for every backend (docs/DESIGN.md section 3).

This module knows token ids and nothing else: no mlx, no torch, no text. A
backend runs the model passes and hands back, per step, a few short host lists
(`Scores`); accepting and committing happen here.
"""

import random
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, List, Optional, Protocol, Sequence, Union

from .policy import AdaptiveBlock, FixedBlock
from .sampling import SamplingParams


@dataclass
class Scores:
    """What one draft+verify step hands back to the host, in one transfer.

    draft:   d[1..L-1], the drafted tokens (empty in AR mode).
    target:  greedy: the verify pass's argmax a[0..L-1].
             sampling: a candidate bonus token per index: drawn from
             normalize(max(p_i - q_i, 0)) for i < L-1, from p_{L-1} for the last.
    ratio:   sampling only: p_i(d[i+1]) / q_i(d[i+1]) for i < L-1.
    """

    draft: List[int]
    target: List[int]
    ratio: Optional[List[float]] = None


class Backend(Protocol):
    """The model passes and cache operations one backend supplies."""

    vocab_size: int
    max_positions: int

    def prefill(self, tokens: Sequence[int], params: SamplingParams) -> int:
        """AR pass over the prompt (appending to the cache); returns the first token."""

    def draft(self, token: int, length: int, params: SamplingParams) -> Any:
        """Diffusion pass on [token, MASK, ...] (`length` positions); device-side result."""

    def verify(self, token: int, drafted: Any, params: SamplingParams) -> Scores:
        """AR pass on [token, d1..] appending to the cache; the step's one host sync."""

    def trim(self, n: int) -> None:
        """Drop the last n entries of the cache."""

    def cache_length(self) -> int: ...


@dataclass
class DecodeStats:
    """Running figures of one generation; `tokens_per_step[i]` is accepted + 1 of step i."""

    prompt_tokens: int = 0
    tokens_per_step: List[int] = field(default_factory=list)

    @property
    def steps(self) -> int:
        return len(self.tokens_per_step)

    @property
    def mean_tokens_per_step(self) -> float:
        return sum(self.tokens_per_step) / max(1, self.steps)

    def histogram(self) -> dict:
        return dict(sorted(Counter(self.tokens_per_step).items()))


def accept(scores: Scores, params: SamplingParams, rng: random.Random) -> List[int]:
    """The tokens a step emits: the accepted drafts d[1..m] and the bonus token."""
    draft, target = scores.draft, scores.target
    m = 0
    if params.greedy:
        while m < len(draft) and draft[m] == target[m]:
            m += 1
    else:
        while m < len(draft) and rng.random() < min(1.0, scores.ratio[m]):
            m += 1
    return draft[:m] + [target[m]]


def eos_set(eos_token_id: Union[int, Iterable[int], None]) -> frozenset:
    if eos_token_id is None:
        return frozenset()
    if isinstance(eos_token_id, int):
        return frozenset([eos_token_id])
    return frozenset(int(e) for e in eos_token_id)


def check_request(
    prompt: Sequence[int], max_tokens: int, backend: Backend, cached: int = 0
) -> None:
    """Reject input that would otherwise hang or silently read garbage."""
    if len(prompt) == 0:
        raise ValueError("The prompt is empty: give at least one token.")
    bad = [t for t in prompt if not 0 <= t < backend.vocab_size]
    if bad:
        raise ValueError(
            f"Prompt token ids outside the vocabulary [0, {backend.vocab_size}): {bad[:8]}"
        )
    if max_tokens < 0:
        raise ValueError(f"max_tokens must be >= 0, got {max_tokens}")
    needed = cached + len(prompt) + max_tokens
    if needed > backend.max_positions:
        raise ValueError(
            f"The prompt ({cached + len(prompt)} tokens) plus max_tokens ({max_tokens}) "
            f"exceeds the model's context of {backend.max_positions} positions."
        )


def as_token_list(tokens: Any) -> List[int]:
    """Token ids from a list, a framework array, or a batch of one."""
    if hasattr(tokens, "tolist"):
        tokens = tokens.tolist()
    tokens = list(tokens)
    if len(tokens) == 1 and isinstance(tokens[0], (list, tuple)):
        tokens = list(tokens[0])
    return [int(t) for t in tokens]


def per_model(model: Any, name: str, make: Callable[[], Any]) -> Any:
    """A value built once per model object and kept on it (compiled passes, the adaptive policy)."""
    value = getattr(model, name, None)
    if value is None:
        value = make()
        object.__setattr__(model, name, value)
    return value


def decode(
    backend: Backend,
    prompt: Sequence[int],
    *,
    max_tokens: int,
    eos_token_id: Union[int, Iterable[int], None],
    params: SamplingParams = SamplingParams(),
    block_size: Union[int, "FixedBlock", "AdaptiveBlock"] = 1,
    stats: Optional[DecodeStats] = None,
) -> Iterator[int]:
    """Yield accepted tokens in order, never past the first EOS or `max_tokens`.

    `block_size` 1 is plain AR decoding (no draft pass); K > 1 drafts K-1 tokens
    per step and verifies them in one AR pass over K positions; a policy object
    (`AdaptiveBlock`) chooses the length step by step.
    """
    check_request(prompt, max_tokens, backend, backend.cache_length())
    policy = FixedBlock(block_size) if isinstance(block_size, int) else block_size
    stats = stats if stats is not None else DecodeStats()
    stats.prompt_tokens = len(prompt)
    if max_tokens == 0:
        return
    eos = eos_set(eos_token_id)
    rng = random.Random(params.seed)

    token = backend.prefill(prompt, params)
    yield token
    emitted = 1
    while token not in eos and emitted < max_tokens:
        tic = time.perf_counter()  # the whole step but the consumer's time between tokens
        length = policy.length(max_tokens - emitted, backend.cache_length())
        drafted = backend.draft(token, length, params) if length > 1 else None
        scores = backend.verify(token, drafted, params)
        new = accept(scores, params, rng)
        # The cache holds the verify pass's L entries; keep t and the m accepted drafts.
        backend.trim(length - len(new))
        policy.update(length, len(new), time.perf_counter() - tic)
        stats.tokens_per_step.append(len(new))
        for token in new:
            yield token
            emitted += 1
            if token in eos:
                return
