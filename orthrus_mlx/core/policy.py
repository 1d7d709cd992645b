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
# Before any observation, each further draft is expected to be accepted with an even chance.
PRIOR_ACCEPTANCE = 0.5
# Once AR is the best length, the choice is only reconsidered (between probes) after this many
# positions: choosing takes ~0.1 ms of Python, a few percent of a small model's AR step.
AR_RECHECK = 16


class AdaptiveBlock:
    """Picks each step's block length to maximise expected tokens per second.

    `step_seconds[L]` is the measured cost of one step of length L (index 0
    unused; L = 1 is a plain AR step) on an empty cache, `per_position[L]` what
    each cached position adds to it (attention). Acceptance is tracked per draft
    index i as the decayed fraction of the steps that drafted index i whose first
    i+1 drafts were all accepted: every step updates every index it drafted, so the
    estimate of a deep index falls as soon as long blocks stop paying. Each index
    starts from one pseudo-observation of PRIOR_ACCEPTANCE times the index before it.

    When no length beats plain AR the policy decodes AR and probes with a short
    block now and then, the interval doubling while drafting keeps not paying; a
    probe accepted in full is followed at once by one twice as long, so that a
    stretch the drafter predicts well (repetition, boilerplate) is found within a
    few steps. The measured costs are a prior: each timed step corrects its
    length's cost by the ratio of its seconds to the predicted ones (a decayed
    mean, each ratio clipped so that one step stalled by the rest of the machine
    does not outweigh many), so a calibration taken on a busy machine is outgrown.
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
        self.survived = [0.0] * max_size  # decayed count of steps whose drafts 0..i were all accepted
        self.tried = [0.0] * max_size  # decayed count of steps that drafted index i
        self.prior_weight = [1.0] * max_size  # fades as index i is drafted
        self.probe_interval = self.since_probe = min_probe_interval  # the first step probes
        self.next_probe = self.probe_length
        # Observed / predicted seconds per length: decayed sums.
        self.cost_decay = cost_decay
        self.ratio_sum = [0.0] * (max_size + 1)
        self.ratio_weight = [0.0] * (max_size + 1)
        self.ar_until = 0  # below this context, AR stands chosen (see length)

    def expected_tokens(self, limit: int) -> List[float]:
        """Expected tokens emitted by a step of each length 1..limit (index 0 unused)."""
        expected, total, before = [0.0, 1.0], 1.0, 1.0
        for i in range(limit - 1):
            w = self.prior_weight[i]
            reach = (self.survived[i] + w * PRIOR_ACCEPTANCE * before) / (self.tried[i] + w)
            before = min(reach, before)  # all of drafts 0..i accepted: never likelier than 0..i-1
            total += before
            expected.append(total)
        return expected

    def predicted_cost(self, length: int) -> float:
        return self.base_cost[length] + self.per_position[length] * self.context

    def correction(self, length: int) -> float:
        """How far this length's steps have run from the prediction (1 before any timing)."""
        return (self.ratio_sum[length] + PRIOR_WEIGHT) / (self.ratio_weight[length] + PRIOR_WEIGHT)

    def cost(self, length: int) -> float:
        return self.predicted_cost(length) * self.correction(length)

    def observe_cost(self, length: int, seconds: float) -> None:
        # Clipped: one step stalled by the rest of the machine must not outweigh many.
        ratio = min(max(seconds / self.predicted_cost(length), 0.25), 4.0)
        self.ratio_sum[length] = self.ratio_sum[length] * self.cost_decay + ratio
        self.ratio_weight[length] = self.ratio_weight[length] * self.cost_decay + 1

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
        return max(choice, min(self.next_probe, limit)) if probe else choice

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
        if self.since_probe >= self.probe_interval:  # this step was a probe
            if emitted == length and length < self.max_size:
                self.next_probe = min(2 * length, self.max_size)
                return  # all accepted: probe again, longer, at once
            paid = self.best(self.max_size) > 1
            self.probe_interval = (
                self.min_probe_interval if paid else min(2 * self.probe_interval, self.max_probe_interval)
            )
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
