"""What `stream_generate(logprobs=True)` costs: tokens/s with it off and on, interleaved in one
process on the shipped model (or a folder given as the first argument).

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libopenblas.so.0 OPENBLAS_NUM_THREADS=1 \
        python benchmarks/logprobs_cost.py [MODEL] [--max-tokens 150] [--rounds 6]
"""

import argparse
import statistics
import time

from orthrus_mlx import load, stream_generate
from orthrus_mlx.loader import DEFAULT_MODEL


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default=str(DEFAULT_MODEL))
    parser.add_argument("--max-tokens", type=int, default=150)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--block-size", type=int, default=8)
    args = parser.parse_args()
    model, tokenizer = load(args.model)
    prompt = tokenizer.encode("def fibonacci(n):\n    ")
    rates = {False: [], True: []}
    for _ in range(args.rounds):
        for logprobs in (False, True):
            tic, n = time.perf_counter(), 0
            for _ in stream_generate(model, tokenizer, prompt, max_tokens=args.max_tokens, logprobs=logprobs,
                                     block_size=args.block_size):
                n += 1
            rates[logprobs].append(n / (time.perf_counter() - tic))
    off, on = statistics.median(rates[False]), statistics.median(rates[True])
    print(f"median tokens/s: logprobs off {off:.1f}, on {on:.1f}, on/off {on / off:.3f} ({args.rounds} rounds)")


if __name__ == "__main__":
    main()
