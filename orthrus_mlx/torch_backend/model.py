"""Standalone PyTorch Orthrus model: a Qwen3 or Llama base plus the diffusion view's tensors.

Parameter names equal the Hugging Face checkpoint keys (docs/DESIGN.md section 1), so
`state_dict()` can be written to / read from `model.safetensors` without renaming. Numerics follow
mlx-lm's qwen3 / llama in float32: RMSNorm in float32, non-interleaved ("rotate half") RoPE,
per-head q/k norms before RoPE where the base has them (Qwen3; Llama has none), GQA with the
query head h reading key/value head h // (n_heads / n_kv_heads).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from .cache import KVCache


@dataclass
class ModelArgs:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = True
    block_size: Optional[int] = None
    mask_token_id: Optional[int] = None
    eos_token_id: Union[int, List[int], None] = None
    model_type: str = "qwen3"

    @classmethod
    def from_dict(cls, config: Dict[str, Any]) -> "ModelArgs":
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in config.items() if k in names}
        if "rope_theta" not in kwargs and config.get("rope_parameters"):
            kwargs["rope_theta"] = config["rope_parameters"]["rope_theta"]
        if "head_dim" not in kwargs:
            kwargs["head_dim"] = config["hidden_size"] // config["num_attention_heads"]
        if kwargs.get("model_type", "qwen3") not in ("qwen3", "llama"):
            raise ValueError(f"model_type {kwargs['model_type']!r} is not supported (qwen3, llama)")
        return cls(**kwargs)

    @property
    def qk_norm(self) -> bool:
        """Qwen3 normalises each head's queries and keys; Llama does not."""
        return self.model_type == "qwen3"

    @property
    def has_diffusion(self) -> bool:
        return self.block_size is not None and self.mask_token_id is not None


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight.float() * x32).to(x.dtype)


def rope_cos_sin(
    positions: torch.Tensor, head_dim: int, theta: float
) -> Tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of shape positions.shape + (head_dim,) for rotate-half RoPE."""
    inv_freq = theta ** (
        -torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device) / head_dim
    )
    angles = positions.to(torch.float32)[..., None] * inv_freq
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, H, T, D]; cos/sin: [T, D] or [B, T, D]."""
    if cos.dim() == 3:
        cos, sin = cos[:, None], sin[:, None]
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


class Attention(nn.Module):
    """Self-attention holding both views: `*_proj`/`*_norm` (AR) and `*_proj_diff`/`*_norm_diff`."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads = args.num_attention_heads
        self.n_kv_heads = args.num_key_value_heads
        self.head_dim = args.head_dim
        self.rope_theta = args.rope_theta
        self.scale = args.head_dim**-0.5
        dim, q_dim, kv_dim = args.hidden_size, self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        for suffix in ("", "_diff"):
            setattr(self, "q_proj" + suffix, nn.Linear(dim, q_dim, bias=False))
            setattr(self, "k_proj" + suffix, nn.Linear(dim, kv_dim, bias=False))
            setattr(self, "v_proj" + suffix, nn.Linear(dim, kv_dim, bias=False))
            setattr(self, "o_proj" + suffix, nn.Linear(q_dim, dim, bias=False))
            norm = (lambda: RMSNorm(self.head_dim, args.rms_norm_eps)) if args.qk_norm else nn.Identity
            setattr(self, "q_norm" + suffix, norm())
            setattr(self, "k_norm" + suffix, norm())

    def qkv(
        self, x: torch.Tensor, positions: torch.Tensor, diffusion: bool = False
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Post-norm, post-RoPE q [B,H,T,D] and k, v [B,Hkv,T,D] of one view."""
        s = "_diff" if diffusion else ""
        B, T, _ = x.shape
        q = getattr(self, "q_proj" + s)(x).view(B, T, self.n_heads, self.head_dim)
        k = getattr(self, "k_proj" + s)(x).view(B, T, self.n_kv_heads, self.head_dim)
        v = getattr(self, "v_proj" + s)(x).view(B, T, self.n_kv_heads, self.head_dim)
        q = getattr(self, "q_norm" + s)(q).transpose(1, 2)
        k = getattr(self, "k_norm" + s)(k).transpose(1, 2)
        cos, sin = rope_cos_sin(positions, self.head_dim, self.rope_theta)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v.transpose(1, 2)

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        mask: Optional[torch.Tensor],
        diffusion: bool = False,
        is_causal: bool = False,
    ) -> torch.Tensor:
        """Attention of q over k/v (boolean mask, True = may attend), then the view's o_proj."""
        groups = self.n_heads // self.n_kv_heads
        if groups > 1:
            k = k.repeat_interleave(groups, dim=1)
            v = v.repeat_interleave(groups, dim=1)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal, scale=self.scale
        )
        B, _, T, _ = out.shape
        out = out.transpose(1, 2).reshape(B, T, -1)
        return (self.o_proj_diff if diffusion else self.o_proj)(out)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """AR view over a whole sequence, causal."""
        q, k, v = self.qkv(x, positions)
        return self.attend(q, k, v, None, is_causal=True)

    def cached(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        mask: torch.Tensor,
        diffusion: bool = False,
    ) -> torch.Tensor:
        """One view over a preallocated cache layer (keys/values [B, Hkv, S, D]).

        The pass's keys/values are written into the slots at `positions`; then every query
        attends to the first mask.shape[-1] slots under `mask` [T, S] (True = may attend).
        """
        q, k, v = self.qkv(x, positions, diffusion)
        keys.index_copy_(2, positions, k)
        values.index_copy_(2, positions, v)
        B, H, T, D = q.shape
        S, groups = mask.shape[-1], H // self.n_kv_heads
        # Grouped-query attention without copying the cache: the query heads that share a
        # key/value head are stacked along the sequence axis.
        q = q.reshape(B, self.n_kv_heads, groups * T, D)
        out = F.scaled_dot_product_attention(
            q, keys[:, :, :S], values[:, :, :S], attn_mask=mask.repeat(groups, 1), scale=self.scale
        )
        out = out.reshape(B, H, T, D).transpose(1, 2).reshape(B, T, -1)
        return (self.o_proj_diff if diffusion else self.o_proj)(out)


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.self_attn = Attention(args)
        self.mlp = MLP(args.hidden_size, args.intermediate_size)
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        h = x + self.self_attn(self.input_layernorm(x), positions)
        return h + self.mlp(self.post_attention_layernorm(h))

    def cached(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        mask: torch.Tensor,
        diffusion: bool = False,
    ) -> torch.Tensor:
        attn = self.self_attn.cached(self.input_layernorm(x), positions, keys, values, mask, diffusion)
        h = x + attn
        return h + self.mlp(self.post_attention_layernorm(h))


class Decoder(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(args) for _ in range(args.num_hidden_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        h = self.embed_tokens(input_ids)
        for layer in self.layers:
            h = layer(h, positions)
        return self.norm(h)


class Model(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model = Decoder(args)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Shared output head of both views (h already through the final norm)."""
        if self.args.tie_word_embeddings:
            return F.linear(h, self.model.embed_tokens.weight)
        return self.lm_head(h)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """AR view: logits [B, T, V] for positions 0..T-1."""
        return self.logits(self.model(input_ids))

    # Inference over a preallocated KV cache (docs/DESIGN.md sections 2, 3 and 6).

    @property
    def block_size(self) -> Optional[int]:
        return self.args.block_size

    @property
    def mask_token_id(self) -> Optional[int]:
        return self.args.mask_token_id

    @property
    def has_diffusion(self) -> bool:
        return self.args.has_diffusion

    def make_cache(self, capacity: Optional[int] = None, batch_size: int = 1) -> KVCache:
        """An empty cache on the model's device and dtype (default: the whole context)."""
        p = self.model.embed_tokens.weight
        return KVCache(
            self.args.num_hidden_layers,
            self.args.num_key_value_heads,
            self.args.head_dim,
            capacity or self.args.max_position_embeddings,
            batch_size=batch_size,
            device=p.device,
            dtype=p.dtype,
        )

    def forward_cached(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        cache: KVCache,
        diffusion: bool = False,
        kv_len: Optional[int] = None,
    ) -> torch.Tensor:
        """Either view at absolute `positions`, reading the first `kv_len` cache slots.

        A pure tensor function (the cache's offset is left to the caller): with `kv_len` fixed
        (the cache's capacity) every pass of a given length has one shape, for torch.compile
        and CUDA graphs.
        """
        kv_len = cache.capacity if kv_len is None else kv_len
        slots = torch.arange(kv_len, device=positions.device)
        if diffusion:
            # Not causal: every block position sees the whole cache and the whole block.
            mask = (slots[None, :] <= positions[-1:, None]).expand(positions.shape[0], kv_len)
        else:
            mask = slots[None, :] <= positions[:, None]
        h = self.model.embed_tokens(input_ids)
        for i, layer in enumerate(self.model.layers):
            h = layer.cached(h, positions, *cache.layer(i), mask, diffusion)
        return self.logits(self.model.norm(h))

    def step(self, input_ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """AR view of input_ids [B, T] after the cache's entries, which it appends to."""
        length = input_ids.shape[1]
        cache.check_room(length)
        positions = torch.arange(cache.offset, cache.offset + length, device=input_ids.device)
        logits = self.forward_cached(input_ids, positions, cache, kv_len=cache.offset + length)
        cache.offset += length
        return logits

    def draft(self, block: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Diffusion logits for a block at positions cache.offset ...; the cache keeps its entries."""
        if not self.has_diffusion:
            raise ValueError("This checkpoint has no diffusion view (AR mode only).")
        length = block.shape[1]
        cache.check_room(length)
        positions = torch.arange(cache.offset, cache.offset + length, device=block.device)
        return self.forward_cached(block, positions, cache, True, kv_len=cache.offset + length)

    def init_weights(self, std: float = 0.02, seed: int = 0) -> None:
        """Fresh random init; the diffusion view starts as a copy of the AR view."""
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in self.named_parameters():
                if "norm" in name.split(".")[-2]:
                    p.fill_(1.0)
                else:
                    p.copy_(torch.randn(p.shape, generator=gen) * std)
        self.copy_ar_to_diffusion()

    def copy_ar_to_diffusion(self) -> None:
        with torch.no_grad():
            for layer in self.model.layers:
                attn = layer.self_attn
                for name in ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm"):
                    if isinstance(getattr(attn, name), nn.Identity):
                        continue  # no q/k norm in this architecture
                    getattr(attn, name + "_diff").weight.copy_(getattr(attn, name).weight)

    def diffusion_parameters(self) -> Dict[str, nn.Parameter]:
        return {n: p for n, p in self.named_parameters() if "_diff" in n}
