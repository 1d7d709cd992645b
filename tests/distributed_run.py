"""What each rank does under `mlx.launch -n 2 --backend ring -- python tests/distributed_run.py OUT
MODEL QUANT_BASE QUANT_DRAFTER` (tests/test_distributed.py): load sharded, decode, write OUT/rank<r>.json.

One launch checks everything, since starting the ranks dominates: greedy and sampling at a
fixed block length, `auto` over costs only rank 0 has, a quantized base with a quantized
drafter adapter, and the `generate`, `chat` and `server` commands.
"""

import contextlib
import io
import json
import sys
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from orthrus_mlx import cli
from orthrus_mlx.backend import adaptive_block, cost_key
from orthrus_mlx.core.costs import CostStore
from orthrus_mlx.distributed import world
from orthrus_mlx.generate import mlx_generate
from orthrus_mlx.loader import load

PROMPT = [5, 17, 42, 9, 100, 7]
MAX_TOKENS = 16


def layer_parameters(model) -> int:
    return sum(v.size for _, v in tree_flatten(model.layers[0].parameters()))


def decode(model, **kwargs):
    cache = model.make_cache()
    tokens = list(mlx_generate(model, PROMPT, max_tokens=MAX_TOKENS, prompt_cache=cache, **kwargs))
    return tokens, cache[0].keys.shape[1]


def auto_run(model, rank: int):
    """`auto` over costs that only rank 0's store has (rank 1 must not measure: it would wait
    alone); the lengths each rank picked."""
    store = CostStore()
    if rank == 0:
        size = model.block_size
        store.entries[cost_key(model)] = {
            "base": [0.0] + [0.01 * (1 + 0.05 * L) for L in range(1, size + 1)],
            "per_position": [0.0] * (size + 1),
        }
    policy = adaptive_block(model, store)
    lengths, choose = [], policy.length
    policy.length = lambda *a: lengths.append(choose(*a)) or lengths[-1]
    tokens = list(mlx_generate(model, PROMPT, max_tokens=MAX_TOKENS, block_size=policy))
    return {"tokens": tokens, "lengths": lengths, "costs": policy.policy.base_cost}


def command(argv, stdin: str = ""):
    out, err = io.StringIO(), io.StringIO()
    sys.stdin = io.StringIO(stdin)
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(argv)
    return {"code": code, "stdout": out.getvalue(), "stderr": err.getvalue()}


def main(out: Path, model_path: str, quant_base: str, quant_drafter: str) -> None:
    group = world()
    rank = group.rank()
    model, _ = load(model_path)
    result = {"size": group.size(), "layer_parameters": layer_parameters(model)}
    result["heads"] = [model.layers[0].self_attn.n_heads, model.layers[0].self_attn.n_kv_heads]
    result["greedy"], result["cache_heads"] = decode(model, block_size=4)
    result["sampled"], _ = decode(model, block_size=4, temperature=0.8, seed=7)
    result["unseeded"], _ = decode(model, block_size=4, temperature=0.8)
    result["auto"] = auto_run(model, rank)

    quantized, _ = load(quant_base, drafter=quant_drafter)
    result["quantized"], _ = decode(quantized, block_size=4)
    result["quantized_layer_parameters"] = layer_parameters(quantized)

    flags = ["--model", model_path, "--max-tokens", "8", "--temp", "0", "--block-size", "4"]
    result["generate"] = command(["generate", "--prompt", "hello", *flags])
    # Only rank 0's stdin holds the messages: the others must follow what rank 0 read.
    result["chat"] = command(["chat", *flags], "hello\n/stats\n" if rank == 0 else "")
    result["server"] = command(["server", "--model", model_path])
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    mx.eval(mx.distributed.all_sum(mx.array(1.0), stream=mx.cpu))  # leave together


if __name__ == "__main__":
    main(Path(sys.argv[1]), *sys.argv[2:5])
