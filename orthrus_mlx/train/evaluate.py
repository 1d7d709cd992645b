"""Greedy tokens per step of a trained checkpoint (docs/DESIGN.md section 3), for the model card.

Decoding is the shared step over the PyTorch backend (`torch_generate`); the AR check
compares it with `ar_greedy`, a cacheless loop that recomputes the whole prefix each token.
"""

from collections import Counter
from typing import Dict, List, Sequence

import torch

from ..core.step import DecodeStats
from ..torch_backend.generate import torch_generate
from ..torch_backend.model import Model


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
        stats = DecodeStats()
        tokens = list(torch_generate(model, prompt, eos_ids, max_tokens, block_size=block_size, stats=stats))
        steps += stats.tokens_per_step
        if check_ar:
            matches += tokens == ar_greedy(model, prompt, max_tokens, eos_ids, device)
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
