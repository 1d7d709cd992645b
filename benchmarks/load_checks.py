"""What the loader's checks cost: load_model with and without the NaN/inf check of the weights.

    python benchmarks/load_checks.py [--runs 15] [--model PATH]

Interleaved runs, median of each; the header/config checks run in both (they read headers only).
"""

import argparse
import statistics
import time
import warnings

import mlx.core as mx

from orthrus_mlx import loader


def timed_load(path) -> float:
    start = time.perf_counter()
    model, _ = loader.load_model(path)
    mx.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=str(loader.DEFAULT_MODEL))
    parser.add_argument("--runs", type=int, default=15)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    check = loader.check_weights_finite
    timed_load(args.model)  # warm: imports, file cache
    with_check, without = [], []
    for _ in range(args.runs):
        loader.check_weights_finite = check
        with_check.append(timed_load(args.model))
        loader.check_weights_finite = lambda *a, **k: None
        without.append(timed_load(args.model))
    loader.check_weights_finite = check
    a, b = statistics.median(with_check), statistics.median(without)
    print(f"{args.model}: load_model {b * 1e3:.1f} ms without the NaN/inf check, {a * 1e3:.1f} ms with it "
          f"(+{(a - b) * 1e3:.1f} ms, {100 * (a - b) / b:+.1f}%), median of {args.runs}")


if __name__ == "__main__":
    main()
