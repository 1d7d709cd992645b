"""Orthrus on MLX: mlx-lm's Qwen3 (the AR view) plus a per-layer diffusion view.

The AR view is mlx-lm's Qwen3 untouched, so `model(tokens, cache=cache)` behaves
exactly like `mlx_lm.models.qwen3.Model`. The diffusion view (`model.draft`) has
its own q/k/v/o projections and q/k norms, shares everything else, and attends
non-causally over the layer's AR cache plus the block being drafted.
"""

from dataclasses import dataclass
from typing import Any, List, Optional, Union

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models import qwen3
from mlx_lm.models.cache import KVCache


@dataclass
class ModelArgs(qwen3.ModelArgs):
    block_size: Optional[int] = None
    mask_token_id: Optional[int] = None
    eos_token_id: Union[int, List[int], None] = None

    @property
    def has_diffusion(self) -> bool:
        return self.block_size is not None and self.mask_token_id is not None


class Attention(qwen3.Attention):
    def __init__(self, args: ModelArgs):
        super().__init__(args)
        dim, head_dim = args.hidden_size, args.head_dim
        self.q_proj_diff = nn.Linear(dim, self.n_heads * head_dim, bias=False)
        self.k_proj_diff = nn.Linear(dim, self.n_kv_heads * head_dim, bias=False)
        self.v_proj_diff = nn.Linear(dim, self.n_kv_heads * head_dim, bias=False)
        self.o_proj_diff = nn.Linear(self.n_heads * head_dim, dim, bias=False)
        self.q_norm_diff = nn.RMSNorm(head_dim, eps=args.rms_norm_eps)
        self.k_norm_diff = nn.RMSNorm(head_dim, eps=args.rms_norm_eps)

    def draft(self, x: mx.array, cache: KVCache) -> mx.array:
        B, L, _ = x.shape
        queries = self.q_norm_diff(self.q_proj_diff(x).reshape(B, L, self.n_heads, -1))
        keys = self.k_norm_diff(self.k_proj_diff(x).reshape(B, L, self.n_kv_heads, -1))
        values = self.v_proj_diff(x).reshape(B, L, self.n_kv_heads, -1)
        queries = self.rope(queries.transpose(0, 2, 1, 3), offset=cache.offset)
        keys = self.rope(keys.transpose(0, 2, 1, 3), offset=cache.offset)
        values = values.transpose(0, 2, 1, 3)

        # Write the block into the cache's free slots and hand them straight
        # back: the pass sees cache + block without copying the whole cache,
        # and the next verify pass overwrites those slots anyway.
        keys, values = cache.update_and_fetch(keys, values)
        cache.trim(L)

        # No mask: every block position sees the whole cache and the whole block.
        output = mx.fast.scaled_dot_product_attention(
            queries, keys, values, scale=self.scale, mask=None
        )
        return self.o_proj_diff(output.transpose(0, 2, 1, 3).reshape(B, L, -1))


class TransformerBlock(qwen3.TransformerBlock):
    def __init__(self, args: ModelArgs):
        super().__init__(args)
        if args.has_diffusion:
            self.self_attn = Attention(args)

    def draft(self, x: mx.array, cache: KVCache) -> mx.array:
        h = x + self.self_attn.draft(self.input_layernorm(x), cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class Qwen3Model(qwen3.Qwen3Model):
    def __init__(self, args: ModelArgs):
        super().__init__(args)
        self.layers = [TransformerBlock(args) for _ in range(args.num_hidden_layers)]


class Model(qwen3.Model):
    """`__call__` is the AR view (mlx-lm compatible); `draft` is the diffusion view."""

    def __init__(self, args: ModelArgs):
        super().__init__(args)
        self.model = Qwen3Model(args)

    @property
    def block_size(self) -> Optional[int]:
        return self.args.block_size

    @property
    def mask_token_id(self) -> Optional[int]:
        return self.args.mask_token_id

    @property
    def has_diffusion(self) -> bool:
        return self.args.has_diffusion

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
