"""Stage 1: train the AR (base Qwen3) view from scratch with next-token cross-entropy."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from orthrus_mlx.torch_backend.model import Model

from .data import fixed_windows, random_windows
from .schedule import Budget, cosine_lr


@dataclass
class BaseTrainConfig:
    steps: int = 1000
    batch: int = 16
    seq_len: int = 256
    lr: float = 3e-3
    warmup: int = 50
    weight_decay: float = 0.1
    seed: int = 0
    eval_every: int = 100
    minutes: Optional[float] = None  # wall-clock budget; the schedule follows whichever ends first


def ar_parameters(model: Model) -> list:
    return [p for n, p in model.named_parameters() if "_diff" not in n]


@torch.no_grad()
def eval_ar_loss(model: Model, windows: torch.Tensor, batch: int = 16) -> float:
    model.eval()
    losses = []
    for i in range(0, len(windows), batch):
        x = windows[i : i + batch]
        logits = model(x[:, :-1])
        losses.append(F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten()).item())
    model.train()
    return float(np.mean(losses))


def train_base(
    model: Model,
    train_stream: np.ndarray,
    heldout_stream: np.ndarray,
    cfg: BaseTrainConfig,
    device: str = "cpu",
    log: Callable[[str], None] = print,
) -> dict:
    """Trains the AR view in place; returns a summary (losses, tokens seen, seconds)."""
    gen = torch.Generator().manual_seed(cfg.seed)
    params = ar_parameters(model)
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=(0.9, 0.95),
    )
    eval_set = fixed_windows(heldout_stream, 32, cfg.seq_len + 1).to(device)
    model.train()
    budget = Budget(cfg.steps, cfg.minutes)
    history = []
    loss_value: Optional[float] = None
    step = 0
    while not budget.done(step):
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, budget.progress(step), cfg.lr, cfg.warmup)
        x = random_windows(train_stream, cfg.batch, cfg.seq_len + 1, gen).to(device)
        logits = model(x[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        loss_value = loss.item()
        step += 1
        if step % cfg.eval_every == 0 or budget.done(step):
            heldout = eval_ar_loss(model, eval_set)
            elapsed = budget.elapsed()
            history.append({"step": step, "train_loss": loss_value, "heldout_loss": heldout})
            log(f"base step {step} loss {loss_value:.3f} heldout {heldout:.3f} "
                f"{elapsed / step:.2f}s/step")
    return {
        "steps": step,
        "tokens_seen": step * cfg.batch * cfg.seq_len,
        "final_train_loss": loss_value,
        "final_heldout_loss": history[-1]["heldout_loss"] if history else None,
        "seconds": budget.elapsed(),
        "history": history,
    }
