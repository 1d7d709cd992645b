"""One conversation's KV cache and the token ids it holds, reused across turns and requests."""

from typing import Any, List, Sequence

from .model import Model


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
    then `pc.commit(prompt, emitted)` (also after an interrupted generation).
    """

    def __init__(self, model: Model):
        self.model = model
        self.reset()

    def reset(self) -> None:
        self.cache: List[Any] = self.model.make_cache()
        self.tokens: List[int] = []

    def __len__(self) -> int:
        return len(self.tokens)

    def prepare(self, prompt: Sequence[int]) -> List[int]:
        """Trim the cache to its longest common prefix with `prompt`; the tokens left to prefill.

        At least one token is always left, since the prefill's last logits give the first token.
        """
        prompt = list(prompt)
        keep = common_prefix_length(self.tokens, prompt)
        if keep == len(prompt):
            keep -= 1
        keep = max(keep, 0)
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

    def _truncate(self, n: int) -> None:
        for c in self.cache:
            if c.offset > n:
                c.trim(c.offset - n)
        self.tokens = self.tokens[:n]
