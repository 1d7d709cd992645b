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

from .policy import BlockPolicy, FixedBlock, block_policy
from .sampling import SamplingParams


@dataclass
class Scores:
    """What one draft+verify step hands back to the host, in one transfer.

    draft:   d[1..L-1], the drafted tokens (empty in AR mode).
    target:  greedy: the verify pass's argmax a[0..L-1].
             sampling: a candidate bonus token per index: drawn from
             normalize(max(p_i - q_i, 0)) for i < L-1, from p_{L-1} for the last.
    ratio:   sampling only: p_i(d[i+1]) / q_i(d[i+1]) for i < L-1.
    logprobs: only from a backend asked for them: the verify pass's log-softmax rows
             [L, vocab] (a device array), row i scoring the token after position i.
    """

    draft: List[int]
    target: List[int]
    ratio: Optional[List[float]] = None
    logprobs: Any = None


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

    # Optional: `block_room() -> Optional[int]`, the most positions the next block may span
    # (a cache quantized from some position on must not be crossed mid-block; MLXBackend).


@dataclass
class Step:
    """What one decoding step emitted: `tokens`, of which the first `accepted` are drafts
    (d1..dm) and the last is the verify pass's own (the bonus), unless EOS or max_tokens
    cut the step short. `drafted` is how many drafts it verified (0 for prefill and AR).
    `logprobs`, from a backend asked for them: per token, the base model's log-softmax row
    it was scored with (the prefill's or the verify pass's), whatever drafted it."""

    tokens: List[int]
    drafted: int = 0
    accepted: int = 0
    prompt_tokens: int = 0  # what the step prefilled: the prompt, on the first step only
    logprobs: Optional[List[Any]] = None


@dataclass
class DecodeStats:
    """Running figures of one generation; `tokens_per_step[i]` is what step i emitted."""

    prompt_tokens: int = 0
    tokens_per_step: List[int] = field(default_factory=list)

    def record(self, step: Step) -> None:
        """Count a step's emitted tokens; the prefill's token is no decoding step."""
        if step.prompt_tokens:
            self.prompt_tokens = step.prompt_tokens
        else:
            self.tokens_per_step.append(len(step.tokens))

    @property
    def steps(self) -> int:
        return len(self.tokens_per_step)

    @property
    def mean_tokens_per_step(self) -> float:
        return sum(self.tokens_per_step) / max(1, self.steps)

    def histogram(self) -> dict:
        return dict(sorted(Counter(self.tokens_per_step).items()))


def accept(scores: Scores, params: SamplingParams, rng: random.Random) -> int:
    """How many drafts the step accepts (m): the bonus token is then `scores.target[m]`."""
    draft, target = scores.draft, scores.target
    m = 0
    if params.greedy:
        while m < len(draft) and draft[m] == target[m]:
            m += 1
    else:
        while m < len(draft) and rng.random() < min(1.0, scores.ratio[m]):
            m += 1
    return m


def eos_set(eos_token_id: Union[int, Iterable[int], None]) -> frozenset:
    """EOS ids as a set, from None, an int or a list (configs and callers use all three)."""
    if eos_token_id is None:
        return frozenset()
    if isinstance(eos_token_id, int):
        return frozenset([eos_token_id])
    return frozenset(int(e) for e in eos_token_id)


def check_context(prompt_tokens: int, max_tokens: int, context: int) -> None:
    """A prompt plus what may be generated must fit the model's positions: an error, not a silent stop."""
    if prompt_tokens + max_tokens > context:
        raise ValueError(
            f"The prompt ({prompt_tokens} tokens) plus max_tokens ({max_tokens}) "
            f"exceeds the model's context of {context} positions."
        )


def check_request(prompt: Sequence[int], max_tokens: int, backend: Backend, cached: int = 0) -> None:
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
    check_context(cached + len(prompt), max_tokens, backend.max_positions)


def as_token_list(tokens: Any) -> List[int]:
    """Token ids from a list, a framework array, or a batch of one."""
    if hasattr(tokens, "tolist"):
        tokens = tokens.tolist()
    tokens = list(tokens)
    if len(tokens) == 1 and isinstance(tokens[0], (list, tuple)):
        tokens = list(tokens[0])
    return [int(t) for t in tokens]


def per_model(model: Any, name: str, make: Callable[[], Any]) -> Any:
    """A value built once per model object and kept on it (the compiled passes)."""
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
    block_size: Union[int, BlockPolicy] = 1,
) -> Iterator[Step]:
    """Yield one `Step` per step (the prefill's token first), never past the first EOS or
    `max_tokens`.

    `block_size` 1 is plain AR decoding (no draft pass); K > 1 drafts K-1 tokens
    per step and verifies them in one AR pass over K positions; a policy object
    (`AdaptiveBlock`) chooses the length step by step.
    """
    check_request(prompt, max_tokens, backend, backend.cache_length())
    policy = FixedBlock(block_size) if isinstance(block_size, int) else block_size
    if max_tokens == 0:
        return
    eos = eos_set(eos_token_id)
    rng = random.Random(params.seed)

    token = backend.prefill(prompt, params)
    first = getattr(backend, "prefill_logprobs", None)  # set by a backend asked for logprobs
    yield Step([token], prompt_tokens=len(prompt), logprobs=None if first is None else [first])
    emitted = 1
    while token not in eos and emitted < max_tokens:
        tic = time.perf_counter()  # the step itself, not what the consumer does with it
        room = max_tokens - emitted
        if hasattr(backend, "block_room"):  # a cache that changes form at some position
            room = min(room, backend.block_room() or room)
        length = policy.length(room, backend.cache_length())
        drafted = backend.draft(token, length, params) if length > 1 else None
        scores = backend.verify(token, drafted, params)
        m = accept(scores, params, rng)
        # The cache holds the verify pass's L entries; keep t and the m accepted drafts.
        backend.trim(length - 1 - m)
        policy.update(length, m + 1, time.perf_counter() - tic)
        new = scores.draft[:m] + [scores.target[m]]
        cut = next((i + 1 for i, t in enumerate(new) if t in eos), len(new))
        new = new[: min(cut, max_tokens - emitted)]
        emitted += len(new)
        token = new[-1]
        rows = None if scores.logprobs is None else [scores.logprobs[i] for i in range(len(new))]
        yield Step(new, length - 1, min(m, len(new)), logprobs=rows)


def generate_steps(
    model: Any,
    make_backend: Callable[[List[int], BlockPolicy], Backend],
    make_adaptive: Callable[[], BlockPolicy],
    prompt_tokens: Any,
    eos_token_id: Union[int, Iterable[int], None],
    max_tokens: int,
    params: SamplingParams,
    use_diffusion: bool,
    block_size: Union[int, str, BlockPolicy, None],
) -> Iterator[Step]:
    """What every backend's `*_generate` does around `decode`: the user's block_size as a
    policy, the caller's EOS ids joined with the model config's, a backend for the prompt."""
    policy = block_policy(block_size, use_diffusion and model.has_diffusion, model.block_size, make_adaptive)
    prompt = as_token_list(prompt_tokens)
    eos = eos_set(eos_token_id) | eos_set(model.args.eos_token_id)
    backend = make_backend(prompt, policy)
    return decode(backend, prompt, max_tokens=max_tokens, eos_token_id=eos, params=params, block_size=policy)


def token_ids(steps: Iterator[Step], stats: Optional[DecodeStats] = None) -> Iterator[int]:
    """The tokens of `steps` one at a time, each step counted in `stats` as it comes."""
    for step in steps:
        if stats is not None:
            stats.record(step)
        yield from step.tokens
