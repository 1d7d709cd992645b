"""Aggregate throughput of batched decoding: B sequences decoded together vs one at a time.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libopenblas.so.0 OPENBLAS_NUM_THREADS=1 \\
        taskset -c 1 python benchmarks/batch.py --model smollm2 --json benchmarks/results/batch.json

For B in --batch-sizes, the first B held-out prompts (chat template) are decoded greedily for
--max-tokens each: one at a time with mlx_generate, and together with BatchDecoder, each at
block length 1 (AR) and K. Reports tokens per CPU-second of this process (robust to other
processes on the core) and per wall second, prefill included, and whether every batched
sequence equals its alone decoding.
"""

import argparse
import json
import time
from pathlib import Path

from orthrus_mlx import load, mlx_generate
from orthrus_mlx.batch import BatchDecoder
from orthrus_mlx.cli.flags import chat_prompt

ASSETS = Path(__file__).resolve().parents[1] / "orthrus_mlx" / "assets"
DRAFTER_PROMPTS = ASSETS / "smollm2-drafter" / "heldout_prompts.json"


def alone(model, prompts, max_tokens, block_size):
    return [list(mlx_generate(model, p, max_tokens=max_tokens, block_size=block_size)) for p in prompts]


def batched(model, prompts, max_tokens, block_size):
    decoder = BatchDecoder(model)
    uids = [decoder.insert(p, max_tokens=max_tokens, block_size=block_size) for p in prompts]
    tokens = {u: [] for u in uids}
    steps = 0
    while len(decoder):
        for uid, new, _, _ in decoder.step():
            tokens[uid] += new
        steps += 1
    return [tokens[u] for u in uids]


def timed(run, *args):
    cpu, wall = time.process_time(), time.perf_counter()
    out = run(*args)
    return out, time.process_time() - cpu, time.perf_counter() - wall


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--batch-sizes", default="1,2,4")
    p.add_argument("--block-size", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--modes", default=None, help="comma-separated subset of the modes, e.g. 'batched AR'")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    model, tokenizer = load(args.model)
    texts = json.loads(DRAFTER_PROMPTS.read_text())
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    prompts = [chat_prompt(tokenizer, [{"role": "user", "content": t}], {}) for t in texts[: max(sizes)]]
    modes = {
        "alone AR": (alone, 1), f"alone K={args.block_size}": (alone, args.block_size),
        "batched AR": (batched, 1), f"batched K={args.block_size}": (batched, args.block_size),
    }
    if args.modes:
        modes = {name: modes[name] for name in args.modes.split(",")}
    for run, k in modes.values():  # trace the compiled passes for every shape first
        for b in sizes:
            run(model, prompts[:b], 4, k)

    results = []
    print(f"{'B':>2} {'mode':<14} {'tokens':>6} {'tok/CPU-s':>9} {'tok/s':>7} identical")
    for b in sizes:
        reference = None
        for name, (run, k) in modes.items():
            out, cpu, wall = timed(run, model, prompts[:b], args.max_tokens, k)
            reference = reference or out
            n = sum(len(t) for t in out)
            row = dict(batch=b, mode=name, tokens=n, cpu_s=round(cpu, 2), wall_s=round(wall, 2),
                       tok_per_cpu_s=round(n / cpu, 2), tok_per_s=round(n / wall, 2), identical=out == reference)
            results.append(row)
            print(f"{b:>2} {name:<14} {n:>6} {n / cpu:>9.2f} {n / wall:>7.2f} {out == reference}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(dict(model=args.model, max_tokens=args.max_tokens,
                                                   prompts=len(prompts), results=results), indent=1) + "\n")


if __name__ == "__main__":
    main()
