"""One conversation's KV cache and the token ids it holds, reused across turns and requests."""

from typing import Any, List, Optional, Sequence

import mlx.core as mx
from mlx_lm.models.cache import can_trim_prompt_cache

from .kv_cache import held_prefix, make_cache
from .models.qwen3 import Model


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class PromptCache:
    """A per-layer KV cache plus the ids of the tokens whose keys/values it holds.

    Use: `new = pc.prepare(prompt)`, generate over `new` with `prompt_cache=pc.cache`,
    then `pc.commit(prompt, emitted)` (also after an interrupted generation). After a
    generation that raised, drop the cache instead: it may hold a half-built graph.
    """

    def __init__(self, model: Model, max_kv_size: Optional[int] = None):
        self.model, self.max_kv_size = model, max_kv_size
        self.reset()

    def reset(self) -> None:
        self.cache: List[Any] = make_cache(self.model, self.max_kv_size)
        self.tokens: List[int] = []

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def nbytes(self) -> int:
        """Bytes its KV arrays take (a fork's shared arrays counted in each holder: an upper bound)."""
        return sum(c.nbytes for c in self.cache)

    def prepare(self, prompt: Sequence[int]) -> List[int]:
        """Trim the cache to its longest common prefix with `prompt`; the tokens left to prefill.

        At least one token is always left, since the prefill's last logits give the first token.
        """
        prompt = list(prompt)
        keep = common_prefix_length(self.tokens, prompt)
        if keep == len(prompt):
            keep -= 1
        keep = max(keep, 0)
        if keep < len(self.tokens) and not can_trim_prompt_cache(self.cache):
            self.reset()  # a rotating cache that has wrapped cannot be cut back: start afresh
            keep = 0
        self._truncate(keep)
        return prompt[keep:]

    def commit(self, prompt: Sequence[int], emitted: Sequence[int]) -> None:
        """Record what the cache holds after generating `emitted` from `prompt`.

        The engine leaves prompt + emitted-but-last in the cache; a generation stopped
        early may have cached drafts the caller never saw, so trim to what is known.
        """
        known = list(prompt) + list(emitted)
        held = min(c.offset for c in self.cache)
        self.tokens = known
        self._truncate(min(held, len(known)))
        # MLX runs a graph on the stream of the thread that built it; evaluate it now, so
        # that the next request, maybe on another thread, finds plain data.
        mx.eval([c.state for c in self.cache if not c.empty()])

    def _truncate(self, n: int) -> None:
        for c in self.cache:
            if c.offset > n:
                c.trim(c.offset - n)
        self.tokens = self.tokens[:n]

    def fork(self, n: int) -> "PromptCache":
        """A new cache holding this one's first `n` tokens, sharing its arrays.

        Sharing is safe: a KV cache writes by slice assignment, which gives the
        writer a new array and leaves every other holder's data as it was.
        """
        other = PromptCache(self.model, self.max_kv_size)
        n = min(n, len(self.tokens))
        prefix = [held_prefix(c, n) for c in self.cache]
        if n > 0 and None not in prefix:
            other.cache, other.tokens = prefix, self.tokens[:n]
        return other  # a rotating cache is not forked: the branch is prefilled afresh


class PromptCachePool:
    """A few prompt caches, so that interleaved conversations each keep their own prefix.

    A prompt takes the cache it extends; one that branches off a cache gets a fork
    at the branch point, and the least recently used cache makes room. With `max_bytes`,
    least recently used caches are also dropped after each commit until the rest fit.
    With a `disk` tier (prompt_disk.DiskTier), a cache leaving memory is written there, and a
    prompt that shares more with an entry on disk than with any cache in memory loads it back.

    `take` and `commit` serve one generation at a time, which extends the cache it took in
    place. Generations that run side by side (the batch) `lend` a cache instead: a fork, so
    that the pool's own caches stay as they are, given back when the generation ends, where it
    replaces the caches it extends (as mlx-lm's `LRUPromptCache.insert_cache` drops prefixes).
    """

    def __init__(self, model: Model, size: int = 4, max_bytes: Optional[int] = None, disk=None,
                 max_kv_size: Optional[int] = None):
        if size < 1:
            raise ValueError(f"The prompt cache pool needs at least one cache, got {size}")
        if max_bytes is not None and max_bytes < 1:
            raise ValueError(f"The prompt cache pool's byte bound must be >= 1, got {max_bytes}")
        self.model, self.size, self.max_bytes, self.disk = model, size, max_bytes, disk
        self.max_kv_size = max_kv_size
        self.caches: List[PromptCache] = []  # least recently used first

    def __len__(self) -> int:
        return len(self.caches)

    def take(self, prompt: Sequence[int]) -> PromptCache:
        best, shared = None, -1
        for pc in self.caches:  # the most recent wins ties
            n = common_prefix_length(pc.tokens, prompt)
            if n >= shared:
                best, shared = pc, n
        from_disk = self._from_disk(prompt, shared)
        if from_disk is not None:
            best = from_disk
        elif best is not None and shared == len(best.tokens):
            self.caches.remove(best)
            self.caches.append(best)
            return best
        else:
            best = best.fork(shared) if best is not None else PromptCache(self.model, self.max_kv_size)
        if len(self.caches) >= self.size:
            self._evict(self.caches[0])
        self.caches.append(best)
        return best

    def lend(self, prompt: Sequence[int]) -> PromptCache:
        """A cache of its own holding the longest prefix of `prompt` the pool has (memory or
        disk; all of the prompt but its last token at most), for `give_back`."""
        pc = self.take(prompt)
        return pc.fork(len(prompt) - len(pc.prepare(prompt)))

    def give_back(self, pc: PromptCache, prompt: Sequence[int], emitted: Sequence[int]) -> None:
        """Keep a lent cache after generating `emitted` from `prompt` (`pc.commit`'s arguments)."""
        pc.commit(prompt, emitted)
        for other in [c for c in self.caches if common_prefix_length(c.tokens, pc.tokens) == len(c.tokens)]:
            self.caches.remove(other)  # all it holds, `pc` holds
        if len(self.caches) >= self.size:
            self._evict(self.caches[0])
        self.caches.append(pc)
        self.fit()

    def _from_disk(self, prompt: Sequence[int], shared_in_memory: int) -> Optional[PromptCache]:
        if self.disk is None:
            return None
        key, shared = self.disk.find(prompt)
        if key is None or shared <= shared_in_memory:
            return None
        return self.disk.load(key)

    def _evict(self, pc: PromptCache) -> None:
        self.caches.remove(pc)
        if self.disk is not None:
            self.disk.save(pc)

    def flush(self) -> None:
        """Write every cache in memory to the disk tier (at shutdown)."""
        if self.disk is not None:
            for pc in self.caches:
                self.disk.save(pc)

    def commit(self, pc: PromptCache, prompt: Sequence[int], emitted: Sequence[int]) -> None:
        """`pc.commit`, dropping `pc` if even that fails."""
        try:
            pc.commit(prompt, emitted)
        except BaseException:
            self.discard(pc)
            raise
        self.fit()

    @property
    def nbytes(self) -> int:
        return sum(pc.nbytes for pc in self.caches)

    def fit(self) -> None:
        """Drop least recently used caches (the newest last of all) until the pool is within `max_bytes`."""
        if self.max_bytes is None:
            return
        while self.caches and self.nbytes > self.max_bytes:
            self._evict(self.caches[0])

    def discard(self, pc: PromptCache) -> None:
        """Drop `pc`, e.g. after a generation over it failed; later prompts start afresh."""
        if pc in self.caches:
            self.caches.remove(pc)
