"""Stage 2: train the diffusion view on the frozen base by KL distillation.

Only `*_proj_diff` / `*_norm_diff` train (initialised as copies of the AR view). Each training
sequence gets several blocks [x_s, MASK, ...] of K positions at random starts s; block index i
learns the frozen base's next-token distribution for position s+i+1 (its AR logits at s+i).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from orthrus_mlx.torch_backend.model import Model

from .data import fixed_windows, random_windows
from .schedule import Budget, cosine_lr
from .views import ar_hidden, block_inputs, diffusion_pass


@dataclass
class DiffusionTrainConfig:
    steps: int = 1000
    batch: int = 16
    seq_len: int = 256
    block_sizes: Tuple[int, ...] = (8, 16, 32)
    block_tokens_per_seq: int = 128  # blocks per sequence = this // K
    lr: float = 2e-3
    warmup: int = 30
    seed: int = 0
    eval_every: int = 100
    minutes: Optional[float] = None  # wall-clock budget; the schedule follows whichever ends first


def sample_starts(batch: int, blocks: int, seq_len: int, block_size: int,
                  gen: torch.Generator, low: int = 1) -> torch.Tensor:
    """Block starts s in [low, T-K+1]: a non-empty prefix and a teacher for every block index."""
    return torch.randint(low, seq_len - block_size + 2, (batch, blocks), generator=gen)


def distill_logits(model: Model, ids: torch.Tensor, starts: torch.Tensor, block_size: int,
                   teacher_pass: Optional[Tuple[torch.Tensor, list]] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Student logits [B, nb, K-1, V] and the teacher's [B, nb, K-1, V] for the same positions.

    `teacher_pass` is `ar_hidden(model, ids)` when the caller kept it from an earlier step.
    The teacher's head runs only where a block needs it: on a large vocabulary the projection
    over every position would cost more than the rest of the teacher pass."""
    K = block_size
    B, nb = starts.shape
    with torch.no_grad():
        hidden, kvs = teacher_pass if teacher_pass is not None else ar_hidden(model, ids)
        index = (starts[:, :, None] + torch.arange(K - 1, device=ids.device)).reshape(B, -1)
        teacher = model.logits(torch.gather(hidden, 1, index[:, :, None].expand(-1, -1, hidden.shape[-1])))
    tokens, positions, mask = block_inputs(ids, starts, K, model.args.mask_token_id)
    student = diffusion_pass(model, kvs, tokens, positions, mask).view(B, nb, K, -1)[:, :, :-1]
    return student, teacher.view(B, nb, K - 1, -1)


def kl_loss(student: torch.Tensor, teacher: torch.Tensor, index_decay: float = 1.0) -> torch.Tensor:
    """KL(teacher || student) averaged over positions, block index i weighted by index_decay**i.

    Index i of a block is verified only if indices 0..i-1 were accepted, so with a decay below 1
    the loss spends the drafter's capacity where acceptance is decided (student and teacher are
    [..., K-1, V], the block index second to last)."""
    log_s = F.log_softmax(student.float(), dim=-1)
    log_t = F.log_softmax(teacher.float(), dim=-1)
    per_position = (log_t.exp() * (log_t - log_s)).sum(-1)  # [..., K-1]
    weights = index_decay ** torch.arange(per_position.shape[-1], device=per_position.device, dtype=per_position.dtype)
    return ((per_position * weights).sum(-1) / weights.sum()).mean()


@torch.no_grad()
def evaluate_blocks(model: Model, windows: torch.Tensor, block_size: int, blocks: int = 4,
                    seed: int = 1234) -> dict:
    """KL, per-index top-1 agreement with the base, and the mean accepted-prefix length + 1.

    The last is a teacher-forced proxy for tokens per step (the base's argmax is conditioned on
    the real text rather than on accepted drafts).
    """
    gen = torch.Generator().manual_seed(seed)
    starts = sample_starts(len(windows), blocks, windows.shape[1], block_size, gen).to(windows.device)
    student, teacher = distill_logits(model, windows, starts, block_size)
    agree = (student.argmax(-1) == teacher.argmax(-1)).float()  # [B, nb, K-1]
    accepted = agree.cumprod(dim=-1).sum(-1)
    return {
        "kl": kl_loss(student, teacher).item(),
        "top1": agree.mean().item(),
        "top1_per_index": agree.mean(dim=(0, 1)).tolist(),
        "tokens_per_block": (accepted + 1).mean().item(),
    }


def freeze_base(model: Model) -> list:
    """requires_grad only on the diffusion tensors; returns them."""
    params = []
    for name, p in model.named_parameters():
        p.requires_grad_("_diff" in name)
        if "_diff" in name:
            params.append(p)
    return params


def train_diffusion(
    model: Model,
    train_stream: np.ndarray,
    heldout_stream: np.ndarray,
    cfg: DiffusionTrainConfig,
    device: str = "cpu",
    eval_block_sizes: Sequence[int] = (8, 16, 32),
    log: Callable[[str], None] = print,
    rollouts: Optional[torch.Tensor] = None,
    rollout_prefix: int = 0,
) -> dict:
    """Trains the diffusion view in place; returns a summary with held-out metrics per K.

    With `rollouts` ([N, T] base greedy continuations after `rollout_prefix` real tokens) the
    blocks are drawn from those rows and start inside the greedy part, instead of real text.
    """
    gen = torch.Generator().manual_seed(cfg.seed)
    params = freeze_base(model)
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.0)
    eval_set = fixed_windows(heldout_stream, 16, cfg.seq_len).to(device)
    model.eval()  # no dropout anywhere; eval mode only documents that the base is frozen
    before = {K: evaluate_blocks(model, eval_set, K) for K in eval_block_sizes}
    budget = Budget(cfg.steps, cfg.minutes)
    history = []
    step = 0
    while not budget.done(step):
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, budget.progress(step), cfg.lr, cfg.warmup)
        K = cfg.block_sizes[int(torch.randint(len(cfg.block_sizes), (1,), generator=gen))]
        blocks = max(cfg.block_tokens_per_seq // K, 1)
        if rollouts is None:
            ids = random_windows(train_stream, cfg.batch, cfg.seq_len, gen).to(device)
            starts = sample_starts(cfg.batch, blocks, cfg.seq_len, K, gen)
        else:
            rows = torch.randint(len(rollouts), (cfg.batch,), generator=gen)
            ids = rollouts[rows].to(device)
            starts = sample_starts(cfg.batch, blocks, ids.shape[1], K, gen, low=rollout_prefix)
        student, teacher = distill_logits(model, ids, starts.to(device), K)
        loss = kl_loss(student, teacher)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        if step % cfg.eval_every == 0 or budget.done(step):
            metrics = evaluate_blocks(model, eval_set, 16)
            history.append({"step": step, "train_kl": loss.item(), **metrics})
            log(f"diffusion step {step} K={K} kl {loss.item():.3f} "
                f"heldout K=16: kl {metrics['kl']:.3f} top1 {metrics['top1']:.3f} "
                f"tokens/block {metrics['tokens_per_block']:.2f} "
                f"{(budget.elapsed()) / step:.2f}s/step")
    after = {K: evaluate_blocks(model, eval_set, K) for K in eval_block_sizes}
    return {
        "steps": step,
        "sequences_seen": step * cfg.batch,
        "context_tokens_seen": step * cfg.batch * cfg.seq_len,
        "seconds": budget.elapsed(),
        "before": before,
        "after": after,
        "history": history,
    }
