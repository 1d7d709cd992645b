"""KV cache options as mlx-lm has them: a quantized cache from some position on, a bounded one.

The caches themselves are mlx-lm's (`KVCache`, `QuantizedKVCache`, `RotatingKVCache`); this
module only decides which one a generation uses and when a full-precision cache is quantized,
with mlx-lm's rule, so that Orthrus' output equals mlx-lm's `generate_step` with the same options.
"""

from dataclasses import dataclass
from typing import Any, List, Optional, Union

from mlx.utils import tree_map
from mlx_lm.generate import DEFAULT_QUANTIZED_KV_START, maybe_quantize_kv_cache  # noqa: F401 (re-exported)
from mlx_lm.models.cache import KVCache, QuantizedKVCache, RotatingKVCache

KV_BITS = (4, 8)
DEFAULT_KV_GROUP_SIZE = 64
DEFAULT_PREFILL_STEP_SIZE = 2048


@dataclass(frozen=True)
class CacheOptions:
    """mlx-lm's `generate_step` cache options; `kv_bits` None keeps the cache in the model's dtype."""

    kv_bits: Optional[int] = None
    kv_group_size: int = DEFAULT_KV_GROUP_SIZE
    quantized_kv_start: int = DEFAULT_QUANTIZED_KV_START
    max_kv_size: Optional[int] = None
    prefill_step_size: int = DEFAULT_PREFILL_STEP_SIZE

    def __post_init__(self):
        if self.kv_bits is not None and self.kv_bits not in KV_BITS:
            raise ValueError(f"kv_bits must be one of {KV_BITS}, got {self.kv_bits}")
        if self.kv_group_size < 1:
            raise ValueError(f"kv_group_size must be >= 1, got {self.kv_group_size}")
        if self.quantized_kv_start < 0:
            raise ValueError(f"quantized_kv_start must be >= 0, got {self.quantized_kv_start}")
        if self.max_kv_size is not None and self.max_kv_size < 1:
            raise ValueError(f"max_kv_size must be >= 1, got {self.max_kv_size}")
        if self.prefill_step_size < 1:
            raise ValueError(f"prefill_step_size must be >= 1, got {self.prefill_step_size}")
        if self.kv_bits is not None and self.max_kv_size is not None:
            raise ValueError("kv_bits and max_kv_size cannot be combined (mlx-lm cannot quantize a rotating cache)")

    def check_head_dim(self, model: Any) -> None:
        """mx.quantize groups along the head dimension: the group size must divide it."""
        args = model.args
        head_dim = getattr(args, "head_dim", None) or args.hidden_size // args.num_attention_heads
        if self.kv_bits is not None and head_dim % self.kv_group_size:
            raise ValueError(
                f"kv_group_size {self.kv_group_size} does not divide the model's head dimension {head_dim}"
            )


def make_cache(model: Any, max_kv_size: Optional[int] = None) -> List[Any]:
    """A fresh cache per layer: the model's own, or mlx-lm's rotating one of `max_kv_size` entries
    (with mlx-lm's 4 kept first tokens, as `make_prompt_cache` gives a model without `make_cache`)."""
    if max_kv_size is None:
        return model.make_cache()
    return [RotatingKVCache(max_size=max_kv_size, keep=4) for _ in model.layers]


def maybe_quantize(cache: List[Any], options: CacheOptions) -> None:
    """mlx-lm's rule, in place: each full-precision layer holding `quantized_kv_start` entries or
    more becomes a `QuantizedKVCache` (a one-time conversion, no copy kept)."""
    maybe_quantize_kv_cache(cache, options.quantized_kv_start, options.kv_group_size, options.kv_bits)


def is_quantized(cache: List[Any]) -> bool:
    return bool(cache) and isinstance(cache[0], QuantizedKVCache)


def block_room(cache: List[Any], options: CacheOptions) -> Optional[int]:
    """Most positions the next block may span, or None for no bound.

    An AR step at position p reads a quantized cache exactly when p >= quantized_kv_start. A
    block that straddled that position would verify its later tokens on full-precision keys, so
    the block stops there; the cache is quantized at the end of that step, as mlx-lm would.
    """
    if options.kv_bits is None or is_quantized(cache):
        return None
    return max(1, options.quantized_kv_start - cache[0].offset)


def drafts(model: Any, use_diffusion: bool, block_size: Union[int, str, Any, None]) -> bool:
    """Whether a generation with these options may run blocks longer than one token."""
    if not (use_diffusion and model.has_diffusion):
        return False
    if block_size is None:
        return model.block_size > 1
    if isinstance(block_size, int):
        return block_size > 1
    if block_size == "auto":
        return True
    return getattr(block_size, "max_size", 1) > 1  # anything else is refused by block_policy


def check_rotating(cache: List[Any], drafting: bool) -> None:
    """A rotating cache overwrites its oldest entries once full, and a rejected draft cannot be
    trimmed back out of it exactly (docs/DESIGN.md section 3): AR decoding only."""
    if drafting and any(isinstance(c, RotatingKVCache) for c in cache):
        raise ValueError(
            "A bounded KV cache (max_kv_size) cannot be trimmed exactly after a rejected draft: "
            "use it with --block-size 1 (plain AR decoding, block_size=1)."
        )


def held_prefix(c: Any, n: int) -> Optional[Any]:
    """A new cache of `c`'s kind holding its first `n` entries (sharing its arrays: a cache writes
    by slice assignment, so neither holder sees the other's writes), or None for a cache whose
    entries are not in position order (a rotating one)."""
    if type(c) is KVCache:
        prefix = KVCache()
    elif type(c) is QuantizedKVCache:
        prefix = QuantizedKVCache(c.group_size, c.bits)
    else:
        return None
    if c.keys is not None and n > 0:
        prefix.keys, prefix.values = tree_map(lambda x: x[..., :n, :], (c.keys, c.values))
        prefix.offset = n
    return prefix
