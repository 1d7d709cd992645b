"""One model over several processes (`mlx.launch`): the group, and what every rank must share.

Tensor parallelism (`Model.shard`) makes every rank run every pass; an all-sum after each
attention and each MLP hands all ranks the same hidden state, hence the same logits. What
else decides a step must be the same everywhere, or the ranks' passes stop matching and they
wait on each other forever: the sampling seed, and the step costs an adaptive block policy
reads, and for the server each request (cli/server.py). All are rank 0's, sent to the others
here (a broadcast is an all-sum in which every other rank adds zeros).
"""

import random
from typing import Any, Callable, List, Optional, Sequence

import mlx.core as mx
import numpy as np

from .core.costs import PROCESS_STORE, CostStore, measure_cost_lines
from .core.policy import AdaptiveBlock
from .core.step import Backend

Group = mx.distributed.Group


def world() -> Group:
    """The group `mlx.launch` started this process in; a group of one otherwise."""
    return mx.distributed.init()


def is_primary(group: Optional[Group] = None) -> bool:
    """Whether this process is rank 0: the one that prints, reads input and keeps files."""
    return (group or world()).rank() == 0


def model_group(model: Any) -> Optional[Group]:
    """The group a model is sharded over (`Model.shard`), None for a whole model."""
    return getattr(model, "tensor_group", None)


def broadcast(values: mx.array, group: Group) -> mx.array:
    """Rank 0's `values` on every rank (the same shape and dtype must be passed everywhere)."""
    if group.rank() != 0:
        values = mx.zeros_like(values)
    return mx.distributed.all_sum(values, group=group, stream=mx.cpu)


def broadcast_floats(values: Sequence[float], group: Group) -> List[float]:
    """Rank 0's numbers, as float32: rank 0 too gets them back rounded, like everyone."""
    return broadcast(mx.array(list(values), dtype=mx.float32), group).tolist()


def broadcast_bytes(data: Optional[bytes], group: Group) -> Optional[bytes]:
    """Rank 0's bytes (or None) on every rank; what the others pass is ignored. Two all-sums:
    the length (plus one, so that 0 says None), then the payload."""
    data = data if group.rank() == 0 else None
    size = int(broadcast(mx.array(0 if data is None else len(data) + 1, dtype=mx.int32), group).item())
    if size <= 1:
        return None if size == 0 else b""
    buffer = mx.array(np.frombuffer(data, np.uint8)) if data is not None else mx.zeros((size - 1,), mx.uint8)
    return bytes(np.array(broadcast(buffer, group)))


def broadcast_text(text: Optional[str], group: Group) -> Optional[str]:
    """Rank 0's text (or None) on every rank; what the others pass is ignored."""
    data = broadcast_bytes(None if text is None else text.encode(), group)
    return None if data is None else data.decode()


def shared_seed(seed: Optional[int], group: Group) -> int:
    """The caller's seed, or else one rank 0 draws: every rank must draw the same samples."""
    if seed is not None:
        return seed
    return int(broadcast(mx.array(random.randrange(2**31), dtype=mx.int32), group).item())


class RankZeroTimes:
    """A block policy whose timed steps are rank 0's on every rank, so that all take the same
    lengths (each rank's own clock would differ). One small all-sum per step."""

    def __init__(self, policy: AdaptiveBlock, group: Group):
        self.policy, self.group = policy, group

    def length(self, remaining: int, context: int = 0) -> int:
        return self.policy.length(remaining, context)

    def update(self, length: int, emitted: int, seconds: Optional[float] = None) -> None:
        if seconds is not None:
            seconds = broadcast_floats([seconds], self.group)[0]
        self.policy.update(length, emitted, seconds)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.policy, name)


def shared_adaptive_policy(
    key: str, make_backend: Callable[[], Backend], max_size: int, store: Optional[CostStore], group: Group
) -> RankZeroTimes:
    """`costs.adaptive_policy` for a sharded model: rank 0's stored or measured step costs.

    The ranks measure together (every pass needs all of them) only when rank 0's store lacks
    them; only rank 0's store is read and written."""
    store = store if store is not None else PROCESS_STORE
    measure = lambda: measure_cost_lines(make_backend, max_size)
    stored = int(broadcast(mx.array(int(store.has(key, max_size))), group).item())
    if group.rank() == 0:
        base, per_position = store.costs(key, max_size, measure)
    elif not stored:
        base, per_position = measure()
    else:
        base, per_position = [0.0] * (max_size + 1), [0.0] * (max_size + 1)
    lines = broadcast_floats(list(base[: max_size + 1]) + list(per_position[: max_size + 1]), group)
    policy = AdaptiveBlock(max_size, lines[: max_size + 1], lines[max_size + 1 :])
    return RankZeroTimes(policy, group)
