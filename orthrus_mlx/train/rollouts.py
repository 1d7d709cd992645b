"""Greedy continuations of the frozen base, the text the diffusion view actually drafts on.

At decoding time the block's prefix is the prompt plus the base's own greedy output, and a draft
is accepted only if it equals the base's argmax. Distilling on the base's greedy continuations
makes the teacher at block index i exactly the distribution that verification compares with.
"""

from __future__ import annotations

import numpy as np
import torch

from orthrus_mlx.torch_backend.model import Model

from .data import random_windows
from .views import KV, ar_pass


def _append_one(model: Model, token: torch.Tensor, position: int, kvs: KV) -> tuple[torch.Tensor, KV]:
    """AR view for one new token per row [B, 1] at `position`, reading and extending kvs."""
    positions = torch.tensor([position], device=token.device)
    h = model.model.embed_tokens(token)
    new = []
    for layer, (k_c, v_c) in zip(model.model.layers, kvs):
        attn = layer.self_attn
        q, k, v = attn.qkv(layer.input_layernorm(h), positions)
        k, v = torch.cat([k_c, k], dim=2), torch.cat([v_c, v], dim=2)
        new.append((k, v))
        h = h + attn.attend(q, k, v, None)
        h = h + layer.mlp(layer.post_attention_layernorm(h))
    return model.logits(model.model.norm(h)), new


@torch.no_grad()
def greedy_rollouts(model: Model, stream: np.ndarray, count: int, prefix_len: int, gen_len: int,
                    batch: int = 64, seed: int = 0, device: str = "cpu") -> torch.Tensor:
    """[count, prefix_len + gen_len]: random training prefixes, then the base's greedy tokens."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(0, count, batch):
        ids = random_windows(stream, batch, prefix_len, gen).to(device)
        logits, kvs = ar_pass(model, ids)
        out = [ids]
        token = logits[:, -1:].argmax(-1)
        for i in range(gen_len):
            out.append(token)
            if i + 1 < gen_len:
                logits, kvs = _append_one(model, token, prefix_len + i, kvs)
                token = logits[:, -1:].argmax(-1)
        rows.append(torch.cat(out, dim=1).cpu())
    return torch.cat(rows)[:count]
