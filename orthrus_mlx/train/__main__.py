"""Recreate the tiny Orthrus checkpoint from scratch.

    python -m orthrus_mlx.train --out orthrus_mlx/assets/orthrus-tiny

Stages (each reads/writes the --work folder, so any suffix can be re-run alone):
prepare (corpus, tokenizer, token streams, held-out prompts), base (AR pre-training),
diffusion (KL distillation of the diffusion view on real text), refine (the same on the base's
greedy continuations), eval (torch greedy tokens/step), export.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from . import pipeline
from .base import BaseTrainConfig
from .diffusion import DiffusionTrainConfig

STAGES = ("prepare", "base", "diffusion", "refine", "eval", "export")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m orthrus_mlx.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("orthrus_mlx/assets/orthrus-tiny"))
    p.add_argument("--work", type=Path, default=Path("build/orthrus-train"))
    p.add_argument("--stages", default=",".join(STAGES), help="comma list of " + ",".join(STAGES))
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--threads", type=int, default=2,
                   help="torch CPU threads (1 is faster when other jobs share the cores)")
    p.add_argument("--vocab-size", type=int, default=2048)
    p.add_argument("--block-size", type=int, default=16, help="K written to config.json")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--base-steps", type=int, default=2000)
    p.add_argument("--base-minutes", type=float, default=None,
                   help="wall-clock budget; training stops at whichever budget ends first")
    p.add_argument("--base-batch", type=int, default=16)
    p.add_argument("--base-lr", type=float, default=3e-3)
    p.add_argument("--diff-steps", type=int, default=1500)
    p.add_argument("--diff-minutes", type=float, default=None)
    p.add_argument("--diff-batch", type=int, default=8)
    p.add_argument("--diff-lr", type=float, default=2e-3)
    p.add_argument("--diff-block-sizes", default="8,16,32", help="K sampled per training step")
    p.add_argument("--refine-steps", type=int, default=1600)
    p.add_argument("--refine-minutes", type=float, default=None)
    p.add_argument("--refine-lr", type=float, default=1e-3)
    p.add_argument("--rollouts", type=int, default=4096, help="greedy continuations to distil on")
    p.add_argument("--rollout-prefix", type=int, default=128)
    p.add_argument("--rollout-tokens", type=int, default=64)
    p.add_argument("--eval-max-tokens", type=int, default=64)
    args = p.parse_args(argv)

    stages = args.stages.split(",")
    unknown = set(stages) - set(STAGES)
    if unknown:
        raise SystemExit(f"unknown stage(s): {sorted(unknown)}")
    pipeline.set_threads(args.threads)
    t0 = time.time()
    if "prepare" in stages:
        pipeline.prepare(args.work, args.vocab_size)
    if "base" in stages:
        cfg = BaseTrainConfig(steps=args.base_steps, batch=args.base_batch, seq_len=args.seq_len,
                              lr=args.base_lr, seed=args.seed, minutes=args.base_minutes)
        pipeline.base(args.work, cfg, args.block_size, args.device)
    if "diffusion" in stages:
        sizes = tuple(int(k) for k in args.diff_block_sizes.split(","))
        cfg = DiffusionTrainConfig(steps=args.diff_steps, batch=args.diff_batch,
                                   seq_len=args.seq_len, block_sizes=sizes, lr=args.diff_lr,
                                   seed=args.seed, minutes=args.diff_minutes)
        pipeline.diffusion(args.work, cfg, args.device)
    if "refine" in stages:
        sizes = tuple(int(k) for k in args.diff_block_sizes.split(","))
        cfg = DiffusionTrainConfig(steps=args.refine_steps, batch=args.diff_batch,
                                   seq_len=args.seq_len, block_sizes=sizes, lr=args.refine_lr,
                                   seed=args.seed, minutes=args.refine_minutes, warmup=10)
        pipeline.refine(args.work, cfg, args.rollouts, args.rollout_prefix, args.rollout_tokens,
                        args.device)
    if "eval" in stages:
        pipeline.evaluate(args.work, max_tokens=args.eval_max_tokens, device=args.device)
    if "export" in stages:
        pipeline.export(args.work, args.out)
    print(f"done in {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
