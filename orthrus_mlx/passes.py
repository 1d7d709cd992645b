"""Compiled decoding passes: `Model.__call__` and `Model.draft` with fewer kernel launches.

On a small model, or on MLX's CPU backend, launching an op costs more than
computing it, and a decoding step runs two passes. The only shapes that change
from step to step are those of the attention over the cache, so each pass is
cut there: the cache write and the attention run eagerly on mlx-lm's KVCache,
and everything from one attention to the next (o_proj, residual, MLP, the next
layer's norms, projections and RoPE at an array offset) is one compiled
function per layer and view, traced once per block length. The math is the
model's own modules, called in the same order, except that on the CPU the
rotary angles are computed once per pass instead of twice per layer (MLX's
CPU RoPE rebuilds them on every call; on Metal it is one fused kernel).
"""

import math
import weakref
from typing import Any, Callable, List, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import scaled_dot_product_attention

from .core.step import per_model
from .models.diffusion import DiffusionModel as Model

# MLX keys a compiled function's traces by the address of the Python function it wraps. In
# long test processes a model's pass sometimes ran another model's trace (its weights, its head
# size: a shape error, or wrong tokens where the shapes agreed), so a trace had outlived its
# function and met a new one at the same address; how, we could not reproduce (MLX 0.32.4 erases
# a wrapper's traces when it is freed, from any thread we tried). Every function compiled here
# is kept for the life of the process, so no two ever share an address; each holds its passes
# only weakly, so a model is still freed with its passes and traces.
_COMPILED_FUNCTIONS: List[Callable] = []


def _compile(fun: Callable) -> Callable:
    _COMPILED_FUNCTIONS.append(fun)
    return mx.compile(fun)


def _identity(x: mx.array) -> mx.array:
    return x


def _projections(attn, view: str):
    """q/k/v/o projections and q/k norms of one view; a base without q/k norms (Llama) gets identities."""
    suffix = "_diff" if view == "draft" else ""
    projections = [getattr(attn, name + suffix) for name in ("q_proj", "k_proj", "v_proj", "o_proj")]
    return (*projections, *(getattr(attn, name + suffix, _identity) for name in ("q_norm", "k_norm")))


class CompiledPasses:
    """`passes(tokens, cache, view)`: logits of the AR view ("verify", appends to the
    cache) or of the diffusion view ("draft", leaves the cache as it was)."""

    def __init__(self, model: Model, shared_rope: Optional[bool] = None):
        self.model = model
        self.layers = model.layers
        rope = model.layers[0].self_attn.rope
        if shared_rope is None:
            shared_rope = mx.default_device() == mx.cpu
        # Only plain rotary (nn.RoPE, rotate-half, linear scale at most) has the angles computed
        # below; Llama 3 / YaRN / NTK scaling and the interleaved layout keep the model's RoPE.
        self.shared_rope = shared_rope and type(rope) is nn.RoPE and not rope.traditional
        views = ["verify", "draft"] if model.has_diffusion else ["verify"]
        self.enter = {v: _compile(self._make_enter(v)) for v in views}
        self.between = {
            v: [_compile(self._make_between(i, v)) for i in range(len(self.layers) - 1)] for v in views
        }
        self.leave = {v: _compile(self._make_leave(v)) for v in views}

    def _angles(self, L: int, offset: mx.array):
        """cos and sin of the rotary angles at positions offset .. offset+L-1, as nn.RoPE has them;
        `offset` is a scalar, or one per row of a batch (shape [B])."""
        if not self.shared_rope:
            return offset
        rope = self.layers[0].self_attn.rope
        half = rope.dims // 2
        freqs = mx.exp(-mx.arange(0.0, half) * (math.log(rope.base) / half))
        positions = offset[..., None, None] + mx.arange(L)  # [1, L] or [B, 1, L]
        theta = positions.astype(mx.float32)[..., None] * rope.scale * freqs
        return mx.cos(theta), mx.sin(theta)

    def _rotate(self, attn, x: mx.array, angles) -> mx.array:
        if not self.shared_rope:
            return attn.rope(x, offset=angles)
        cos, sin = angles
        half = cos.shape[-1]
        x1, x2, rest = x[..., :half], x[..., half : 2 * half], x[..., 2 * half :]
        rotated = [x1 * cos - x2 * sin, x1 * sin + x2 * cos]
        return mx.concatenate(rotated + ([rest] if rest.shape[-1] else []), axis=-1).astype(x.dtype)

    def _qkv(self, layer, view: str, h: mx.array, angles):
        attn = layer.self_attn
        q_proj, k_proj, v_proj, _, q_norm, k_norm = _projections(attn, view)
        x = layer.input_layernorm(h)
        B, L, _ = x.shape
        queries = q_norm(q_proj(x).reshape(B, L, attn.n_heads, -1)).transpose(0, 2, 1, 3)
        keys = k_norm(k_proj(x).reshape(B, L, attn.n_kv_heads, -1)).transpose(0, 2, 1, 3)
        values = v_proj(x).reshape(B, L, attn.n_kv_heads, -1).transpose(0, 2, 1, 3)
        return self._rotate(attn, queries, angles), self._rotate(attn, keys, angles), values

    def _residual(self, layer, view: str, h: mx.array, attended: mx.array) -> mx.array:
        o_proj = _projections(layer.self_attn, view)[3]
        B, _, L, _ = attended.shape
        h = h + o_proj(attended.transpose(0, 2, 1, 3).reshape(B, L, -1))
        return h + layer.mlp(layer.post_attention_layernorm(h))

    def _make_enter(self, view: str) -> Callable:
        passes = weakref.proxy(self)  # see _compile: the function outlives the passes

        def enter(tokens, offset):
            h = passes.model.model.embed_tokens(tokens)
            angles = passes._angles(tokens.shape[1], offset)
            return (h, angles, *passes._qkv(passes.layers[0], view, h, angles))

        return enter

    def _make_between(self, i: int, view: str) -> Callable:
        passes = weakref.proxy(self)

        def between(h, attended, angles):
            h = passes._residual(passes.layers[i], view, h, attended)
            return (h, *passes._qkv(passes.layers[i + 1], view, h, angles))

        return between

    def _make_leave(self, view: str) -> Callable:
        passes = weakref.proxy(self)

        def leave(h, attended):
            h = passes._residual(passes.layers[-1], view, h, attended)
            return passes.model.lm_logits(passes.model.model.norm(h))

        return leave

    def __call__(self, tokens: mx.array, cache: List[Any], view: str) -> mx.array:
        if view not in self.enter:
            raise ValueError("This checkpoint has no diffusion view (AR mode only).")
        L = tokens.shape[1]
        draft = view == "draft"
        offset = mx.array(cache[0].offset, dtype=mx.int32)
        h, angles, queries, keys, values = self.enter[view](tokens, offset)
        for i, (layer, c) in enumerate(zip(self.layers, cache)):
            keys, values = c.update_and_fetch(keys, values)
            if draft:
                c.trim(L)  # the block's slots are free again; see Attention.draft
            mask = "causal" if L > 1 and not draft else None
            # mlx-lm's dispatch: on a QuantizedKVCache it attends over the packed keys and
            # values directly (quantized matmuls), never a dequantized copy of the cache.
            attended = scaled_dot_product_attention(
                queries, keys, values, cache=c, scale=layer.self_attn.scale, mask=mask
            )
            if i + 1 < len(self.layers):
                h, queries, keys, values = self.between[view][i](h, attended, angles)
        return self.leave[view](h, attended)


def compiled_passes(model: Model) -> CompiledPasses:
    """The model's compiled passes, built once per model object (traces are reused)."""
    return per_model(model, "_compiled_passes", lambda: CompiledPasses(model))
