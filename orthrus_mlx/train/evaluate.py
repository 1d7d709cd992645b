"""Torch-side greedy Orthrus decoding (docs/DESIGN.md section 3) to measure tokens per step.

No KV cache: every step recomputes the AR view over the committed prefix, which is exact and
cheap at this model size. Used for the model card and the per-K numbers; the MLX engine is the
real implementation.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, List, Sequence

import torch

from orthrus_mlx.torch_backend.model import Model

from .views import ar_pass, block_inputs, diffusion_pass


@dataclass
class GreedyResult:
    tokens: List[int]
    tokens_per_step: List[int] = field(default_factory=list)


def _truncate_at_eos(tokens: List[int], eos_ids: Sequence[int]) -> tuple[List[int], bool]:
    for i, tok in enumerate(tokens):
        if tok in eos_ids:
            return tokens[: i + 1], True
    return tokens, False


@torch.no_grad()
def orthrus_greedy(model: Model, prompt: List[int], max_tokens: int, block_size: int,
                   eos_ids: Sequence[int], device: str = "cpu") -> GreedyResult:
    ids = torch.tensor([prompt], device=device)
    logits, kvs = ar_pass(model, ids)
    t = int(logits[0, -1].argmax())
    out = GreedyResult(tokens=[t])
    if t in eos_ids:
        return out
    while len(out.tokens) < max_tokens:
        n = ids.shape[1]
        L = min(block_size, max_tokens - len(out.tokens) + 1)
        block = torch.tensor([[t]], device=device)
        drafts: List[int] = []
        if L > 1:
            starts = torch.tensor([[n]], device=device)
            tokens, positions, mask = block_inputs(torch.cat([ids, block], 1), starts, L,
                                                   model.args.mask_token_id)
            mask = torch.cat([mask[..., :n], mask[..., n + 1 :]], dim=-1)  # keys: cache 0..n-1 + block
            drafts = diffusion_pass(model, kvs, tokens, positions, mask)[0, :-1].argmax(-1).tolist()
        verify = torch.cat([ids, torch.tensor([[t] + drafts], device=device)], dim=1)
        ar_logits, verify_kvs = ar_pass(model, verify)
        a = ar_logits[0, n:].argmax(-1).tolist()
        m = 0
        while m < len(drafts) and drafts[m] == a[m]:
            m += 1
        t = a[m]
        ids = verify[:, : n + m + 1]
        kvs = [(k[:, :, : n + m + 1], v[:, :, : n + m + 1]) for k, v in verify_kvs]  # trim
        emitted, stop = _truncate_at_eos(drafts[:m] + [t], eos_ids)
        emitted = emitted[: max_tokens - len(out.tokens)]
        out.tokens += emitted
        out.tokens_per_step.append(len(emitted))
        if stop:
            break
    return out


@torch.no_grad()
def ar_greedy(model: Model, prompt: List[int], max_tokens: int, eos_ids: Sequence[int],
              device: str = "cpu") -> List[int]:
    ids = list(prompt)
    out: List[int] = []
    while len(out) < max_tokens:
        t = int(model(torch.tensor([ids], device=device))[0, -1].argmax())
        out.append(t)
        ids.append(t)
        if t in eos_ids:
            break
    return out


def histogram(values: Sequence[int], max_value: int) -> Dict[int, int]:
    counts = Counter(values)
    return {k: counts.get(k, 0) for k in range(1, max_value + 1)}


def evaluate_prompts(model: Model, prompts: List[List[int]], block_size: int, max_tokens: int,
                     eos_ids: Sequence[int], check_ar: bool = False, device: str = "cpu") -> dict:
    """Mean tokens per step over all steps of all prompts, its histogram, and AR agreement."""
    steps: List[int] = []
    matches = 0
    for prompt in prompts:
        res = orthrus_greedy(model, prompt, max_tokens, block_size, eos_ids, device)
        steps += res.tokens_per_step
        if check_ar:
            matches += res.tokens == ar_greedy(model, prompt, max_tokens, eos_ids, device)
    summary = {
        "block_size": block_size,
        "prompts": len(prompts),
        "max_tokens": max_tokens,
        "steps": len(steps),
        "mean_tokens_per_step": sum(steps) / max(len(steps), 1),
        "histogram": histogram(steps, block_size),
    }
    if check_ar:
        summary["ar_identical"] = f"{matches}/{len(prompts)}"
    return summary
