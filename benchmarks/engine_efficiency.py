"""Engine efficiency: one draft+verify step at verify length L against one AR step.

Random weights with the real shapes of Qwen3-0.6B and Qwen3-1.7B (plus the diffusion view),
built in memory (no files), in bf16 and 4-bit. The cache holds `--context` positions (random
keys and values: their content does not change the cost). Timed is the engine's real step
(`MLXBackend.draft` + `verify` + the host sync + `trim`), median of `--repeats` after a warm-up:

    ratio(L) = time of one draft+verify step over L positions / time of one AR step

A step must emit more than ratio(L) tokens on average to beat AR decoding. Where decoding is
memory-bound each pass reads the weights once, so the floor is 2 (two passes).

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libopenblas.so.0 python benchmarks/engine_efficiency.py
"""

import argparse
import gc
import json
import platform
import statistics
import time
from typing import Dict, List

import mlx.core as mx
import mlx.nn as nn

from orthrus_mlx.backend import MLXBackend
from orthrus_mlx.cli.bench import machine_note
from orthrus_mlx.core.sampling import SamplingParams
from orthrus_mlx.models.qwen3 import Model, ModelArgs

SHAPES = {
    "0.6B": dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                 num_key_value_heads=8, head_dim=128),
    "1.7B": dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
                 num_key_value_heads=8, head_dim=128),
}
GREEDY = SamplingParams()
# MLX's CPU backend has fast float32 matmuls (BLAS) but no fast bf16 or quantized ones: a 32-row
# step of a 4-bit 0.6B takes many minutes on a Linux CPU. There the table is taken in float32.
DEFAULT_PRECISIONS = "bfloat16,4bit" if platform.system() == "Darwin" else "float32"


def build(size: str, precision: str) -> Model:
    args = ModelArgs(
        model_type="qwen3", vocab_size=151936, rms_norm_eps=1e-6, rope_theta=1e6,
        max_position_embeddings=40960, tie_word_embeddings=True, block_size=32,
        mask_token_id=151669, eos_token_id=151645, **SHAPES[size],
    )
    model = Model(args)
    model.set_dtype(mx.bfloat16)
    if precision == "4bit":
        nn.quantize(model, group_size=64, bits=4)
    elif precision == "8bit":
        nn.quantize(model, group_size=64, bits=8)
    elif precision == "float32":
        model.set_dtype(mx.float32)
    mx.eval(model.parameters())
    return model


def filled_cache(model: Model, context: int) -> list:
    cache = model.make_cache()
    a = model.args
    dtype = mx.float32 if model.model.norm.weight.dtype == mx.float32 else mx.bfloat16
    for c in cache:
        shape = (1, a.num_key_value_heads, context, a.head_dim)
        c.update_and_fetch(mx.random.normal(shape).astype(dtype), mx.random.normal(shape).astype(dtype))
        mx.eval(c.keys, c.values)
    return cache


def median_seconds(step, repeats: int) -> float:
    step()  # warm-up
    times = []
    for _ in range(repeats):
        mx.synchronize()
        tic = time.perf_counter()
        step()
        mx.synchronize()
        times.append(time.perf_counter() - tic)
    return statistics.median(times)


def measure(model: Model, context: int, lengths: List[int], repeats: int) -> Dict[str, float]:
    backend = MLXBackend(model, filled_cache(model, context))

    def ar_step():
        backend.verify(1, None, GREEDY)
        backend.trim(1)

    def step(L: int):
        def run():
            backend.verify(1, backend.draft(1, L, GREEDY), GREEDY)
            backend.trim(L)

        def both_passes_of_one():
            # The engine never drafts over one position; time the floor's two passes directly.
            token = mx.array([[1]])
            d = mx.argmax(model.draft(token, backend.cache)[0], axis=-1)
            a = mx.argmax(model(token, cache=backend.cache)[0], axis=-1)
            mx.eval(d, a)
            backend.trim(1)

        return run if L > 1 else both_passes_of_one

    out = {"ar_step_s": median_seconds(ar_step, repeats)}
    for L in lengths:
        out[f"step_{L}_s"] = median_seconds(step(L), repeats)
        out[f"ratio_{L}"] = out[f"step_{L}_s"] / out["ar_step_s"]
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="0.6B,1.7B", help=f"subset of {','.join(SHAPES)}")
    parser.add_argument(
        "--precisions",
        default=DEFAULT_PRECISIONS,
        help=f"of float32,bfloat16,8bit,4bit (default here: {DEFAULT_PRECISIONS}; see the note above)",
    )
    parser.add_argument("--lengths", default="1,2,4,8,16,32", help="verify lengths L")
    parser.add_argument("--context", type=int, default=512, help="cached positions")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None, metavar="OUT")
    args = parser.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")]

    results = []
    for size in args.sizes.split(","):
        for precision in args.precisions.split(","):
            model = build(size, precision)
            row = {"model": f"Qwen3-{size} shapes", "precision": precision, "context": args.context}
            row.update(measure(model, args.context, lengths, args.repeats))
            results.append(row)
            print(f"{row['model']} {precision}: AR step {1e3 * row['ar_step_s']:.1f} ms", flush=True)
            del model
            gc.collect()
            mx.clear_cache()

    machine = machine_note()
    print(f"\nOne draft+verify step at verify length L / one AR step; context {args.context}; {machine}\n")
    print("| model | weights | AR step ms | " + " | ".join(f"L={L}" for L in lengths) + " |")
    print("| --- | --- | ---: |" + " ---: |" * len(lengths))
    for r in results:
        ratios = " | ".join(f"{r[f'ratio_{L}']:.2f}" for L in lengths)
        print(f"| {r['model']} | {r['precision']} | {1e3 * r['ar_step_s']:.1f} | {ratios} |")
    print("\nFloor where decoding is memory-bound: 2.00 (each pass reads the weights once).")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "lengths": lengths, "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
