"""What each rank does under `mlx.launch -n 2 --backend ring -- python tests/distributed_run.py OUT
MODEL QUANT_BASE QUANT_DRAFTER ODD_HEADS PORT` (tests/test_distributed.py): load sharded, decode, write
OUT/rank<r>.json.

One launch checks everything, since starting the ranks dominates: greedy and sampling at a
fixed block length, `auto` over costs only rank 0 has, a quantized base with a quantized
drafter adapter, a Llama whose heads do not divide by 2 (its attention stays whole), and the
`generate`, `chat` and `server` commands (rank 0 serves on PORT, a thread of its own process
is the HTTP client, then stops it with SIGINT).
"""

import contextlib
import http.client
import io
import json
import os
import signal
import sys
import threading
import time
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
SERVER_FLAGS = ["--max-tokens", "12", "--temp", "0", "--block-size", "4"]
SERVER_START_S = 300  # loading under a loaded machine


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


def post(address, path: str, body: dict) -> http.client.HTTPResponse:
    conn = http.client.HTTPConnection(*address, timeout=120)
    conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
    return conn.getresponse()


def whole(address, path: str, body: dict) -> dict:
    response = post(address, path, body)
    reply = json.loads(response.read())
    return {"status": response.status, "choices": reply.get("choices"), "usage": reply.get("usage")}


def streamed(address, body: dict, events: int = 0) -> dict:
    """A streamed completion's text and finish reason; with `events`, the client leaves after that many."""
    response = post(address, "/v1/completions", dict(body, stream=True))
    chunks = []
    for line in response:
        line = line.decode().strip()
        if line.startswith("data: {"):
            chunks.append(json.loads(line[len("data: "):])["choices"][0])
            if len(chunks) == events:
                break
    response.close()
    return {"text": "".join(c["text"] for c in chunks), "finish": chunks[-1]["finish_reason"]}


def ask_server(address) -> dict:
    """What a server under `mlx.launch` must answer exactly as one process does: greedy, seeded
    sampling in a chat, a stream cut by a stop string, a client that leaves mid-stream (the
    ranks must stay in step after it), and the first request again (from the prompt cache)."""
    answers = {"greedy": whole(address, "/v1/completions", {"prompt": "hello"})}
    chat = {"messages": [{"role": "user", "content": "hi there"}], "temperature": 0.8, "seed": 7}
    answers["sampled"] = whole(address, "/v1/chat/completions", chat)
    text = answers["greedy"]["choices"][0]["text"]
    answers["stop"] = streamed(address, {"prompt": "hello", "stop": text[len(text) // 2 :][:2] or "zz"})
    answers["left"] = streamed(address, {"prompt": "a long story"}, events=1)
    answers["again"] = whole(address, "/v1/completions", {"prompt": "hello"})
    return answers


def client(address, answers: dict) -> None:
    """Rank 0's client: wait for the server, ask, then stop the server as Ctrl-C would."""
    try:
        deadline = time.monotonic() + SERVER_START_S
        while True:
            try:
                http.client.HTTPConnection(*address, timeout=5).request("GET", "/health")
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        answers.update(ask_server(address))
    except Exception as e:
        answers["error"] = repr(e)
    finally:
        os.kill(os.getpid(), signal.SIGINT)


def main(out: Path, model_path: str, quant_base: str, quant_drafter: str, odd_heads: str, port: str) -> None:
    # A process started with SIGINT ignored (a background job of a shell without job control,
    # as CI may run pytest) passes that on through mlx.launch: the client's Ctrl-C would then
    # never stop rank 0's server and both ranks would wait forever.
    signal.signal(signal.SIGINT, signal.default_int_handler)
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

    err = io.StringIO()
    with contextlib.redirect_stderr(err):  # the one line saying what stays whole
        odd, _ = load(odd_heads)
    result["odd"] = {"greedy": decode(odd, block_size=4)[0], "layer_parameters": layer_parameters(odd),
                     "heads": [odd.layers[0].self_attn.n_heads, odd.layers[0].self_attn.n_kv_heads],
                     "stderr": err.getvalue()}

    flags = ["--model", model_path, "--max-tokens", "8", "--temp", "0", "--block-size", "4"]
    result["generate"] = command(["generate", "--prompt", "hello", *flags])
    # Only rank 0's stdin holds the messages: the others must follow what rank 0 read.
    result["chat"] = command(["chat", *flags], "hello\n/stats\n" if rank == 0 else "")
    answers: dict = {}
    if rank == 0:
        threading.Thread(target=client, args=(("127.0.0.1", int(port)), answers), daemon=True).start()
    result["server"] = command(["server", "--model", model_path, "--port", port, *SERVER_FLAGS])
    result["server"]["answers"] = answers
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    mx.eval(mx.distributed.all_sum(mx.array(1.0), stream=mx.cpu))  # leave together


if __name__ == "__main__":
    main(Path(sys.argv[1]), *sys.argv[2:7])
