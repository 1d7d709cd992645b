"""The two forward views used for training and torch-side evaluation.

`ar_pass` runs the frozen AR view and keeps every layer's post-RoPE keys/values (the "cache");
`diffusion_pass` runs the diffusion view on any number of draft blocks at once: each block reads
the AR keys/values of the positions before its start plus its own keys/values, non-causally.
"""

from __future__ import annotations

from typing import List, Tuple

import torch

from orthrus_mlx.torch_backend.model import Model

KV = List[Tuple[torch.Tensor, torch.Tensor]]


def ar_pass(model: Model, ids: torch.Tensor) -> Tuple[torch.Tensor, KV]:
    """AR logits [B, T, V] and per-layer (k, v) [B, Hkv, T, D] at positions 0..T-1."""
    hidden, kvs = ar_hidden(model, ids)
    return model.logits(hidden), kvs


def ar_hidden(model: Model, ids: torch.Tensor) -> Tuple[torch.Tensor, KV]:
    """The AR view's final normed hidden states [B, T, D] (before the head) and its keys/values."""
    positions = torch.arange(ids.shape[1], device=ids.device)
    h = model.model.embed_tokens(ids)
    kvs = []
    for layer in model.model.layers:
        attn = layer.self_attn
        q, k, v = attn.qkv(layer.input_layernorm(h), positions)
        kvs.append((k, v))
        h = h + attn.attend(q, k, v, None, is_causal=True)
        h = h + layer.mlp(layer.post_attention_layernorm(h))
    return model.model.norm(h), kvs


def block_inputs(
    ids: torch.Tensor, starts: torch.Tensor, block_size: int, mask_token_id: int
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Blocks [x_s, MASK, ..., MASK] for starts [B, nb].

    Returns block token ids [B, nb*K], their absolute positions [B, nb*K] and the boolean
    attention mask [B, 1, nb*K, T + nb*K] over (AR keys 0..T-1, then all block keys).
    """
    B, nb = starts.shape
    T, K = ids.shape[1], block_size
    tokens = torch.full((B, nb, K), mask_token_id, dtype=ids.dtype, device=ids.device)
    tokens[:, :, 0] = torch.gather(ids, 1, starts)
    offsets = torch.arange(K, device=ids.device)
    positions = (starts[:, :, None] + offsets).reshape(B, nb * K)
    query_start = starts.repeat_interleave(K, dim=1)  # [B, nb*K]
    prefix = torch.arange(T, device=ids.device)[None, None, :] < query_start[:, :, None]
    block_id = torch.arange(nb, device=ids.device).repeat_interleave(K)
    same_block = (block_id[:, None] == block_id[None, :]).expand(B, -1, -1)
    mask = torch.cat([prefix, same_block], dim=2)[:, None]
    return tokens.reshape(B, nb * K), positions, mask


def diffusion_pass(
    model: Model, kvs: KV, tokens: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Diffusion-view logits [B, Nq, V] for block tokens; kvs are the AR view's keys/values."""
    h = model.model.embed_tokens(tokens)
    for layer, (k_ar, v_ar) in zip(model.model.layers, kvs):
        attn = layer.self_attn
        q, k, v = attn.qkv(layer.input_layernorm(h), positions, diffusion=True)
        k = torch.cat([k_ar, k], dim=2)
        v = torch.cat([v_ar, v], dim=2)
        h = h + attn.attend(q, k, v, mask, diffusion=True)
        h = h + layer.mlp(layer.post_attention_layernorm(h))
    return model.logits(model.model.norm(h))
