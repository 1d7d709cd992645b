"""The Orthrus decoding step, written once for every backend (ORTHRUS.md section 3).

This module knows token ids and nothing else: no mlx, no torch, no text. A
backend runs the model passes and hands back, per step, a few short host lists
(`Scores`); accepting and committing happen here.
"""

import random
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, List, Optional, Protocol, Sequence, Union


@dataclass(frozen=True)
class SamplingParams:
    """Temperature 0 is greedy. top_k 0 and top_p 1 switch those filters off."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: Optional[int] = None

    def __post_init__(self):
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0, got {self.top_k}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


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


class FixedBlock:
    """The same block length every step (shortened only by max_tokens)."""

    def __init__(self, size: int):
        if size < 1:
            raise ValueError(f"block_size must be >= 1, got {size}")
        self.size = size

    def length(self, remaining: int, context: int = 0) -> int:
        return min(self.size, remaining)

    def update(self, length: int, emitted: int, seconds: Optional[float] = None) -> None:
        pass


# Observations a cost correction needs before it counts as much as its prior.
PRIOR_WEIGHT = 2.0
# Once AR is the best length, the choice is only reconsidered (between probes) after this many
# positions: its inputs barely move in the meantime, and AR steps are where overhead shows most.
AR_RECHECK = 16
# One drafting step in this many goes twice as long as chosen, to keep observing deeper drafts.
EXPLORE_EVERY = 8


class AdaptiveBlock:
    """Picks each step's block length to maximise expected tokens per second.

    `step_seconds[L]` is the measured cost of one step of length L (index 0
    unused; L = 1 is a plain AR step) on an empty cache, `per_position[L]` what
    each cached position adds to it (attention). Acceptance is tracked per draft index i
    as the decayed fraction of the steps that drafted index i whose first i+1 drafts
    were all accepted: every step updates every index it drafted, so the estimate of a
    deep index falls as soon as long blocks stop paying (a rate conditioned on
    the drafts before it would only hear from the stretches where they were
    accepted, and overrate long blocks). An index with few observations leans
    on the indices before it, extrapolated geometrically (a prior whose weight
    fades as observations come in), so depths never tried yet are expected to
    continue the trend of the deepest tried. When no length beats plain AR the policy decodes
    AR and probes with a short block now and then, backing off while drafting
    keeps not paying. A probe accepted in full is followed at once by one twice
    as long, so that a stretch of text the drafter predicts well (repetition,
    boilerplate) is found within a few steps; and one drafting step in
    EXPLORE_EVERY goes twice as long as chosen, so that deeper indices keep
    being observed.

    The measured costs are a prior: each timed step corrects them by the ratio of
    its seconds to the predicted ones (a decayed mean per length, pooled over the
    drafting lengths while a length has few observations of its own), so a
    calibration taken on a busy machine, or under other settings, is outgrown.
    """

    def __init__(self, max_size: int, step_seconds: Sequence[float],
                 per_position: Optional[Sequence[float]] = None, decay: float = 0.95,
                 probe_length: int = 2, min_probe_interval: int = 16, max_probe_interval: int = 128,
                 cost_decay: float = 0.98):
        per_position = per_position if per_position is not None else [0.0] * len(step_seconds)
        if min(len(step_seconds), len(per_position)) < max_size + 1:
            raise ValueError(f"need step costs for lengths 1..{max_size}")
        self.max_size = max_size
        self.base_cost = list(step_seconds)
        self.per_position = list(per_position)
        self.context = 0
        self.decay = decay
        self.probe_length = min(probe_length, max_size)
        self.min_probe_interval = min_probe_interval
        self.max_probe_interval = max_probe_interval
        # Before any observation: a trained drafter's first draft is accepted 7 times in 10,
        # held with the weight of 3 observations, so that one rejection (the first token after a
        # prompt is the hardest to draft) does not send a fresh policy back to AR for good.
        self.first_prior = 0.7
        self.survived = [0.0] * max_size  # decayed count of steps whose drafts 0..i were all accepted
        self.tried = [0.0] * max_size  # decayed count of steps that drafted index i
        self.prior_weight = [3.0] * max_size  # fades as index i is drafted
        self.probe_interval = self.since_probe = min_probe_interval  # the first step probes
        self.next_probe = self.probe_length
        # Observed / predicted seconds: decayed sums per length, and pooled for AR (0) and drafting (1).
        self.cost_decay = cost_decay
        self.ratio_sum = [0.0] * (max_size + 1)
        self.ratio_weight = [0.0] * (max_size + 1)
        self.pool_sum = [0.0, 0.0]
        self.pool_weight = [0.0, 0.0]
        self.timed = set()  # lengths seen once: a length's first step may include tracing it
        self.ar_until = 0  # below this context, AR stands chosen (see length)
        self.extend_to = 0  # the next step's least length (see update)
        self.drafting_steps = 0
        self.cache_key: Optional[str] = None  # where its costs came from and what it learned goes

    LEARNED = ("survived", "tried", "prior_weight", "ratio_sum", "ratio_weight", "pool_sum", "pool_weight")

    def state(self) -> dict:
        """What the policy has learned (acceptance, cost corrections), to carry to a later process."""
        return {name: list(getattr(self, name)) for name in self.LEARNED}

    def restore(self, state: dict) -> None:
        """Take up a `state()`; ignored unless it fits this policy's block size."""
        fits = all(
            isinstance(state.get(name), list) and len(state[name]) == len(getattr(self, name))
            for name in self.LEARNED
        )
        if fits:
            for name in self.LEARNED:
                setattr(self, name, [float(v) for v in state[name]])

    def expected_tokens(self, limit: int) -> List[float]:
        """Expected tokens emitted by a step of each length 1..limit (index 0 unused)."""
        expected, total = [0.0, 1.0], 1.0
        before, survival = 1.0, self.first_prior  # survival: the prior of index 0
        for i in range(limit - 1):
            w = self.prior_weight[i]
            reach = (self.survived[i] + w * survival) / (self.tried[i] + w)
            reach = min(reach, before)  # all of drafts 0..i accepted: never likelier than 0..i-1
            survival = reach * reach / before if before > 0 else 0.0  # the next index's prior
            before = reach
            total += reach
            expected.append(total)
        return expected

    def predicted_cost(self, length: int) -> float:
        return self.base_cost[length] + self.per_position[length] * self.context

    def correction(self, length: int) -> float:
        """How far this length's steps have run from the prediction (1 before any timing)."""
        pool = length > 1
        pooled = (self.pool_sum[pool] + PRIOR_WEIGHT) / (self.pool_weight[pool] + PRIOR_WEIGHT)
        return (self.ratio_sum[length] + PRIOR_WEIGHT * pooled) / (self.ratio_weight[length] + PRIOR_WEIGHT)

    def cost(self, length: int) -> float:
        return self.predicted_cost(length) * self.correction(length)

    def observe_cost(self, length: int, seconds: float) -> None:
        if length not in self.timed:
            self.timed.add(length)
            return
        # Clipped: one step stalled by the rest of the machine must not outweigh many.
        ratio = min(max(seconds / self.predicted_cost(length), 0.25), 4.0)
        pool = length > 1
        d = self.cost_decay
        self.ratio_sum[length] = self.ratio_sum[length] * d + ratio
        self.ratio_weight[length] = self.ratio_weight[length] * d + 1
        self.pool_sum[pool] = self.pool_sum[pool] * d + ratio
        self.pool_weight[pool] = self.pool_weight[pool] * d + 1

    def best(self, limit: int) -> int:
        expected = self.expected_tokens(limit)
        return max(range(1, limit + 1), key=lambda n: expected[n] / self.cost(n))

    def length(self, remaining: int, context: int = 0) -> int:
        self.context = context
        limit = min(self.max_size, remaining)
        probe = limit > 1 and self.since_probe >= self.probe_interval
        if not probe and context < self.ar_until:
            return 1  # settled on AR: nothing but the context and AR timings moved since
        choice = self.best(limit)
        self.ar_until = context + AR_RECHECK if choice == 1 else 0
        if probe:
            return max(choice, min(self.next_probe, limit))
        return max(choice, min(self.extend_to, limit))

    def update(self, length: int, emitted: int, seconds: Optional[float] = None) -> None:
        if seconds is not None:
            self.observe_cost(length, seconds)
        if length == 1:
            self.since_probe += 1
            return
        self.ar_until = 0
        accepted = emitted - 1
        for i in range(length - 1):
            self.tried[i] = self.tried[i] * self.decay + 1
            self.survived[i] = self.survived[i] * self.decay + (i < accepted)
            self.prior_weight[i] *= self.decay
        probe = self.since_probe >= self.probe_interval
        if probe:
            if emitted == length and length < self.max_size:
                self.next_probe = min(2 * length, self.max_size)
                return  # all accepted: probe again, longer, at once
            paid = self.best(self.max_size) > 1
            self.probe_interval = (
                self.min_probe_interval if paid else min(2 * self.probe_interval, self.max_probe_interval)
            )
        # Deep draft indices are only observed by drafting them: every EXPLORE_EVERY-th drafting
        # step goes twice as long as chosen. On a schedule, not after a full block: a full block
        # marks a repetitive stretch, and deep indices seen only there would look too good.
        self.extend_to = 0
        if not probe:
            self.drafting_steps += 1
            if self.drafting_steps % EXPLORE_EVERY == 0:
                self.extend_to = min(2 * length, self.max_size)
        self.next_probe = self.probe_length
        self.since_probe = 0


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


def block_policy(
    block_size: Union[int, str, None],
    use_diffusion: bool,
    model_block_size: Optional[int],
    adaptive: Callable[[], "AdaptiveBlock"],
) -> Union[int, "AdaptiveBlock"]:
    """What `decode` gets for the user's block_size: 1 (AR), the checkpoint's K, an int, or "auto"."""
    if not use_diffusion or model_block_size is None:
        return 1
    if block_size is None:
        return model_block_size
    if block_size == "auto":
        return adaptive()
    if not isinstance(block_size, int):
        raise ValueError(f"block_size must be an int or 'auto', got {block_size!r}")
    return block_size


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
