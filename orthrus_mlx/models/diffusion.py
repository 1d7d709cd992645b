"""The diffusion view, as every architecture has it: mixed into mlx-lm's classes by models/<arch>.py.

The view is each layer's own q/k/v/o projections (`*_proj_diff`, shaped and biased like the
base's `*_proj`), plus q/k norms where the base has them. It shares everything else, and
attends non-causally over the layer's AR cache plus the block being drafted.
"""

import logging
from dataclasses import dataclass
from typing import Any, List, Optional, Union

import mlx.core as mx
import mlx.nn as nn
from mlx.nn.layers.distributed import shard_linear
from mlx_lm.models.base import scaled_dot_product_attention
from mlx_lm.models.cache import KVCache

log = logging.getLogger("orthrus_mlx")
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
NORMS = ("q_norm", "k_norm")


@dataclass
class OrthrusArgs:
    """What an Orthrus config adds to its base's; listed first in a ModelArgs' bases."""

    block_size: Optional[int] = None
    mask_token_id: Optional[int] = None
    eos_token_id: Union[int, List[int], None] = None

    @property
    def has_diffusion(self) -> bool:
        return self.block_size is not None and self.mask_token_id is not None


def linear_shape(module: nn.Module):
    """(out, in) of a linear layer, quantized or not."""
    out_dims, in_dims = module.weight.shape
    if isinstance(module, nn.QuantizedLinear):
        in_dims = in_dims * 32 // module.bits
    return out_dims, in_dims


class DiffusionAttention:
    """Mixed into an mlx-lm attention class (before it in the bases)."""

    def __init__(self, args: Any, *rest):
        super().__init__(args, *rest)
        if args.has_diffusion:
            self.add_diffusion_view()

    def add_diffusion_view(self) -> None:
        """Fresh `*_diff` modules beside the base's (also on a loaded, quantized base)."""
        for name in PROJECTIONS:
            base = getattr(self, name)
            out_dims, in_dims = linear_shape(base)
            setattr(self, f"{name}_diff", nn.Linear(in_dims, out_dims, bias="bias" in base))
        for name in NORMS:
            if hasattr(self, name):
                norm = getattr(self, name)
                setattr(self, f"{name}_diff", nn.RMSNorm(norm.weight.shape[0], eps=norm.eps))

    def draft(self, x: mx.array, cache: KVCache) -> mx.array:
        B, L, _ = x.shape
        queries = self.q_proj_diff(x).reshape(B, L, self.n_heads, -1)
        keys = self.k_proj_diff(x).reshape(B, L, self.n_kv_heads, -1)
        values = self.v_proj_diff(x).reshape(B, L, self.n_kv_heads, -1)
        if hasattr(self, "q_norm_diff"):
            queries, keys = self.q_norm_diff(queries), self.k_norm_diff(keys)
        queries = self.rope(queries.transpose(0, 2, 1, 3), offset=cache.offset)
        keys = self.rope(keys.transpose(0, 2, 1, 3), offset=cache.offset)
        values = values.transpose(0, 2, 1, 3)

        # Write the block into the cache's free slots and hand them straight
        # back: the pass sees cache + block without copying the whole cache,
        # and the next verify pass overwrites those slots anyway.
        keys, values = cache.update_and_fetch(keys, values)
        cache.trim(L)

        # No mask: every block position sees the whole cache and the whole block.
        output = scaled_dot_product_attention(queries, keys, values, cache=cache, scale=self.scale, mask=None)
        return self.o_proj_diff(output.transpose(0, 2, 1, 3).reshape(B, L, -1))


def heads_divide(model: nn.Module, size: int) -> bool:
    """Whether the attention (both views) splits by heads among `size` ranks."""
    attn = model.layers[0].self_attn
    return attn.n_heads % size == 0 and attn.n_kv_heads % size == 0


def check_shardable(model: nn.Module, size: int) -> None:
    """ValueError naming what does not divide among `size` ranks (MLP width, quantized groups).
    Heads that do not divide are no error: the attention then stays whole on every rank."""
    attn, mlp = model.layers[0].self_attn, model.layers[0].mlp
    problems = []
    width = linear_shape(mlp.gate_proj)[0]
    if width % size:
        problems.append(f"an MLP of width {width}")
    for name in ("o_proj", "o_proj_diff") if heads_divide(model, size) else ():
        module = getattr(attn, name, None)
        if isinstance(module, nn.QuantizedLinear) and module.scales.shape[-1] % size:
            problems.append(f"{name}'s {module.scales.shape[-1]} quantization groups per row")
    if isinstance(mlp.down_proj, nn.QuantizedLinear) and mlp.down_proj.scales.shape[-1] % size:
        problems.append(f"down_proj's {mlp.down_proj.scales.shape[-1]} quantization groups per row")
    if problems:
        raise ValueError(
            f"This model cannot be split over {size} ranks: {' and '.join(problems)} do not divide by {size}"
        )


def shard_mlp(mlp: nn.Module, group: mx.distributed.Group) -> None:
    """mlx-lm's MLP split: gate and up by output rows, down by input columns, one all-sum."""
    mlp.gate_proj = shard_linear(mlp.gate_proj, "all-to-sharded", group=group)
    mlp.up_proj = shard_linear(mlp.up_proj, "all-to-sharded", group=group)
    mlp.down_proj = shard_linear(mlp.down_proj, "sharded-to-all", group=group)


class DiffusionBlock:
    """Mixed into an mlx-lm decoder layer: the same norms and MLP around the diffusion attention."""

    def draft(self, x: mx.array, cache: KVCache) -> mx.array:
        h = x + self.self_attn.draft(self.input_layernorm(x), cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class DiffusionModel:
    """Mixed into an mlx-lm `Model`: `__call__` stays the AR view, `draft` is the diffusion view."""

    @property
    def block_size(self) -> Optional[int]:
        return self.args.block_size

    @property
    def mask_token_id(self) -> Optional[int]:
        return self.args.mask_token_id

    @property
    def has_diffusion(self) -> bool:
        return self.args.has_diffusion

    def add_diffusion_view(self, block_size: int, mask_token_id: int) -> None:
        """Give a loaded base a (still untrained) diffusion view; a drafter adapter fills it."""
        if getattr(self, "tensor_group", None) is not None:
            raise ValueError("Attach the diffusion view before sharding the model (loader.load does)")
        self.args.block_size, self.args.mask_token_id = block_size, mask_token_id
        for layer in self.layers:
            layer.self_attn.add_diffusion_view()
        # The passes compiled for the model without its view (core.step.per_model) are stale now.
        vars(self).pop("_compiled_passes", None)

    def shard(self, group: Optional[mx.distributed.Group] = None) -> None:
        """Tensor parallelism, as mlx-lm's `shard`: each rank keeps its share of the heads of both
        views (q/k/v by output rows, o by input columns) and of the MLP, so that a pass costs one
        all-sum per attention and per MLP, and each rank's KV cache holds its own heads.

        Heads that do not divide by the ranks (SmolLM2-135M's 9 and 3 over 2) keep the attention
        whole on every rank, each computing it all, and split only the MLPs (one all-sum each)."""
        group = group or mx.distributed.init()
        check_shardable(self, group.size())
        if heads_divide(self, group.size()):
            for layer in self.layers if self.has_diffusion else ():
                attn = layer.self_attn
                for name in ("q_proj_diff", "k_proj_diff", "v_proj_diff"):
                    setattr(attn, name, shard_linear(getattr(attn, name), "all-to-sharded", group=group))
                attn.o_proj_diff = shard_linear(attn.o_proj_diff, "sharded-to-all", group=group)
            super().shard(group)  # mlx-lm's: the AR projections, the head counts, the MLP
        else:
            attn = self.layers[0].self_attn
            if group.rank() == 0:
                log.warning(
                    "%d query and %d key/value heads do not divide by %d ranks: attention stays whole "
                    "on every rank, only the MLPs are split", attn.n_heads, attn.n_kv_heads, group.size()
                )
            for layer in self.layers:
                shard_mlp(layer.mlp, group)
        self.tensor_group = group
        vars(self).pop("_compiled_passes", None)

    def make_cache(self) -> List[KVCache]:
        return [KVCache() for _ in self.layers]

    def draft(self, inputs: mx.array, cache: List[Any]) -> mx.array:
        """Diffusion logits for a block at positions cache.offset ... ; the cache is left as it was."""
        if not self.has_diffusion:
            raise ValueError("This checkpoint has no diffusion view (AR mode only).")
        h = self.model.embed_tokens(inputs)
        for layer, c in zip(self.layers, cache):
            h = layer.draft(h, c)
        return self.lm_logits(self.model.norm(h))

    def lm_logits(self, h: mx.array) -> mx.array:
        if self.args.tie_word_embeddings:
            return self.model.embed_tokens.as_linear(h)
        return self.lm_head(h)

    def sanitize(self, weights: dict) -> dict:
        if self.args.tie_word_embeddings:
            weights.pop("lm_head.weight", None)
        # Rotary tables are recomputed, never loaded (some exporters save them).
        return {k: v for k, v in weights.items() if "rotary_emb.inv_freq" not in k}
