"""Block-length policies: how many positions each decoding step drafts."""

from typing import Callable, List, Optional, Protocol, Sequence, Union


class BlockPolicy(Protocol):
    """Chooses each step's block length (1 is a plain AR step) and hears how it went."""

    max_size: int

    def length(self, remaining: int, context: int = 0) -> int:
        """The next step's length, at most `remaining`, with `context` positions cached."""

    def update(self, length: int, emitted: int, seconds: Optional[float] = None) -> None:
        """A step of `length` emitted `emitted` tokens (accepted drafts + 1) in `seconds`."""


class FixedBlock:
    """The same block length every step (shortened only by max_tokens)."""

    def __init__(self, size: int):
        if size < 1:
            raise ValueError(f"block_size must be >= 1, got {size}")
        self.max_size = size

    def length(self, remaining: int, context: int = 0) -> int:
        return min(self.max_size, remaining)

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


def block_policy(
    block_size: Union[int, str, BlockPolicy, None],
    use_diffusion: bool,
    model_block_size: Optional[int],
    adaptive: Callable[[], BlockPolicy],
) -> BlockPolicy:
    """The policy for the user's block_size: AR without diffusion, else the checkpoint's K
    (None), a fixed length (an int), a fresh `adaptive()` ("auto"), or the policy given."""
    if not use_diffusion or model_block_size is None:
        return FixedBlock(1)
    if block_size is None:
        return FixedBlock(model_block_size)
    if block_size == "auto":
        return adaptive()
    if isinstance(block_size, int):
        return FixedBlock(block_size)
    if hasattr(block_size, "length") and hasattr(block_size, "update"):
        return block_size
    raise ValueError(f"block_size must be an int, 'auto' or a block policy, got {block_size!r}")
