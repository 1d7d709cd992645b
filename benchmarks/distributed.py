"""Tokens/s and step cost of Orthrus on 1 rank against 2 ranks (`mlx.launch --backend ring`,
localhost), plus the latency of one all-sum: the numbers behind benchmarks/distributed.md.

    python benchmarks/distributed.py [--tokens 64] [--out benchmarks/results/distributed.json]
    python benchmarks/distributed.py --projection    # the two-Mac arithmetic only

Runs the 1-rank measurement itself, then launches itself on 2 ranks (`--rank-run`). Models:
the shipped tiny one, and a random one of 4 wider layers (hidden 1024, 16/8 heads) whose
passes cost more than their launch overhead. Greedy, fixed block lengths 1 (AR) and 4.
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx

from orthrus_mlx.core.step import DecodeStats
from orthrus_mlx.distributed import world
from orthrus_mlx.generate import mlx_generate
from orthrus_mlx.loader import DEFAULT_MODEL, load
from orthrus_mlx.testing import random_checkpoint, tiny_config

PROMPT = [5, 17, 42, 9, 100, 7, 300, 12] * 4
WIDE = dict(
    hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=16,
    num_key_value_heads=8, head_dim=64, vocab_size=2048, block_size=16,
)


def timed(model, block_size: int, tokens: int) -> dict:
    list(mlx_generate(model, PROMPT, max_tokens=8, block_size=block_size))  # traces the passes
    stats, generated = DecodeStats(), []
    for token in mlx_generate(model, PROMPT, max_tokens=tokens, block_size=block_size, stats=stats):
        generated.append(token)
        if len(generated) == 1:  # the prefill's token: decoding starts here
            tic = time.perf_counter()
    seconds = time.perf_counter() - tic
    decoded = len(generated) - 1
    return {
        "tokens": decoded, "seconds": seconds, "tokens_per_s": decoded / seconds,
        "steps": stats.steps, "tokens_per_step": stats.mean_tokens_per_step,
        "seconds_per_step": seconds / stats.steps,
    }


# The projection's inputs; see benchmarks/distributed.md for where each comes from.
MODELS = {  # layers, hidden size, bytes of weights read per pass
    "Qwen3-8B, bf16": (36, 4096, 16.4e9),
    "70B (Llama-3-70B shapes), 8-bit": (80, 8192, 70e9 * 1.06),
}
MAC_BANDWIDTH = 546e9 * 0.7  # M4 Max memory bandwidth, at the 70% decoding usually reaches
LINKS = {"ring (TCP over Thunderbolt 5)": (300e-6, 6e9), "JACCL (RDMA over Thunderbolt 5)": (30e-6, 7e9)}
TOKENS_PER_STEP = 6.0  # Orthrus at K=32, as published (6.35 tokens per forward, up to 7.8)
BLOCK = 32


def projection() -> list:
    """Tokens/s on one Mac against two, for AR and for Orthrus, in a memory-bound model: a pass
    reads all its rank's weights once; an Orthrus step is two passes (draft, verify) over BLOCK
    positions and emits TOKENS_PER_STEP tokens; every all-sum costs its latency plus its bytes."""
    rows = []
    for model, (layers, hidden, weight_bytes) in MODELS.items():
        one_pass = weight_bytes / MAC_BANDWIDTH
        ar_sums, orthrus_sums = 2 * layers, 4 * layers
        rows.append({"model": model, "setup": "1 Mac", "AR tok/s": 1 / one_pass,
                     "Orthrus tok/s": TOKENS_PER_STEP / (2 * one_pass)})
        for link, (latency, bandwidth) in LINKS.items():
            ar = one_pass / 2 + ar_sums * (latency + hidden * 2 / bandwidth)
            step = one_pass + orthrus_sums * (latency + BLOCK * hidden * 2 / bandwidth)
            rows.append({
                "model": model, "setup": f"2 Macs, {link}", "AR tok/s": 1 / ar, "Orthrus tok/s": TOKENS_PER_STEP / step,
                "all-sums per AR token": ar_sums, "all-sums per Orthrus step": orthrus_sums,
                "bytes per all-sum (AR, Orthrus)": (hidden * 2, BLOCK * hidden * 2),
                "communication per Orthrus step (ms)": 1e3 * orthrus_sums * (latency + BLOCK * hidden * 2 / bandwidth),
            })
    return rows


def all_sum_seconds(size: int, repeats: int = 50) -> float:
    group = world()
    x = mx.ones((1, size))
    mx.eval(mx.distributed.all_sum(x, group=group))
    tic = time.perf_counter()
    for _ in range(repeats):
        mx.eval(mx.distributed.all_sum(x, group=group))
    return (time.perf_counter() - tic) / repeats


def measure(models: dict, tokens: int) -> dict:
    results = {}
    for name, path in models.items():
        model, _ = load(path)
        results[name] = {f"K={k}": timed(model, k, tokens) for k in (1, 4)}
    if world().size() > 1:
        results["all_sum_seconds"] = {n: all_sum_seconds(n) for n in (192, 1024, 4 * 1024)}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--out", default="benchmarks/results/distributed.json")
    parser.add_argument("--projection", action="store_true", help="print the two-Mac projection only")
    parser.add_argument("--rank-run", nargs=2, metavar=("MODELS_JSON", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.projection:
        print(json.dumps(projection(), indent=2))
        return
    if args.rank_run:
        results = measure(json.loads(args.rank_run[0]), args.tokens)
        if world().rank() == 0:
            Path(args.rank_run[1]).write_text(json.dumps(results))
        return

    with tempfile.TemporaryDirectory() as tmp:
        wide = random_checkpoint(Path(tmp) / "wide", tiny_config(**WIDE), seed=3)
        models = {"tiny": str(DEFAULT_MODEL), "wide": str(wide)}
        report = {"1 rank": measure(models, args.tokens)}
        out = Path(tmp) / "ranks.json"
        launch = Path(sys.executable).parent / "mlx.launch"
        subprocess.run(
            [str(launch), "-n", "2", "--backend", "ring", "--", sys.executable, __file__,
             "--tokens", str(args.tokens), "--rank-run", json.dumps(models), str(out)],
            check=True, timeout=1800,
        )
        report["2 ranks"] = json.loads(out.read_text())
    report["projection"] = projection()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
