"""Aggregate throughput and latency of the server under 1/2/4/8 concurrent clients: ours batching
(`--decode-concurrency`), ours one request at a time, and `mlx_lm.server` (its own batching) on
the same float32 weights. Greedy chat requests (--mixed: in turn greedy, seeded sampled, with
logprobs, with penalties), loopback, one server process at a time.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libopenblas.so.0 OPENBLAS_NUM_THREADS=1 \\
        python benchmarks/server_throughput.py --json benchmarks/results/server_throughput.json

Each client sends --requests-per-client requests one after another; aggregate tokens/s is all
completion tokens over the wall time of the whole round; latency is per request, whole answers.
"""

import argparse
import http.client
import json
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Optional

HOST = "127.0.0.1"
QUESTIONS = [
    "Give me three tips for staying focused while studying.",
    "Explain what a hash table is in two sentences.",
    "Write a haiku about autumn rain.",
    "What is the capital of Australia, and why is it not Sydney?",
    "List four uses of baking soda around the house.",
    "How do I reverse a list in Python?",
    "Describe the water cycle briefly.",
    "Suggest a name for a bakery and explain it.",
]
# --mixed: the request kinds, in turn by question; the seeds make sampled answers comparable.
MIXED = [
    {},
    {"temperature": 0.7, "top_p": 0.9, "seed": 1},
    {"logprobs": True, "top_logprobs": 3},
    {"repetition_penalty": 1.2, "presence_penalty": 0.3, "temperature": 0.8, "top_k": 40, "seed": 2},
]


def mlx_lm_folder(model: str, folder: Path) -> Path:
    """The base's float32 weights, config and tokenizer in mlx-lm's own folder layout."""
    from mlx_lm.utils import save_config, save_model

    from orthrus_mlx import gguf, load
    from orthrus_mlx.cli.bench import load_mlx_lm_model
    from orthrus_mlx.named import resolve_named

    path, _ = resolve_named(model)
    config, _, _ = gguf.read_gguf(path)
    config.pop("quantization", None)
    save_model(folder, load_mlx_lm_model(path, "float32"))
    save_config(config, folder / "config.json")
    load(model)[1]._tokenizer.save_pretrained(folder)
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def start(command, port: int) -> subprocess.Popen:
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while time.time() < deadline:
        try:
            conn = http.client.HTTPConnection(HOST, port, timeout=5)
            conn.request("GET", "/v1/models")
            if conn.getresponse().status == 200:
                return process
        except OSError:
            time.sleep(0.5)
    process.kill()
    raise RuntimeError(f"{command[:4]} did not start")


def ask(port: int, question: str, max_tokens: int, extra: Optional[dict] = None) -> tuple:
    body = json.dumps({"messages": [{"role": "user", "content": question}], "max_tokens": max_tokens,
                       "temperature": 0.0, **(extra or {})})
    conn = http.client.HTTPConnection(HOST, port, timeout=3600)
    start_time = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
    answer = json.loads(conn.getresponse().read())
    conn.close()
    text = answer["choices"][0]["message"]["content"]
    return time.perf_counter() - start_time, answer["usage"]["completion_tokens"], text


def round_of(port: int, clients: int, per_client: int, max_tokens: int, mixed: bool = False) -> dict:
    results, lock = [], threading.Lock()

    def client(c: int) -> None:
        for r in range(per_client):
            index = (c + r * clients) % len(QUESTIONS)
            question = QUESTIONS[index]
            latency, tokens, text = ask(port, question, max_tokens, MIXED[index % len(MIXED)] if mixed else None)
            with lock:
                results.append((question, latency, tokens, text))

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    wall = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - wall
    latencies = sorted(r[1] for r in results)
    return {
        "clients": clients,
        "tokens_per_s": sum(r[2] for r in results) / wall,
        "p50_s": statistics.median(latencies),
        "p95_s": latencies[min(len(latencies) - 1, int(round(0.95 * (len(latencies) - 1))))],
        "answers": {r[0]: r[3] for r in results},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--clients", default="1,2,4,8")
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--block-size", default="4")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--mixed", action="store_true", help="greedy, sampled, logprobs and penalty requests")
    parser.add_argument("--no-mlx-lm", action="store_true", help="ours only")
    args = parser.parse_args()
    clients = [int(c) for c in args.clients.split(",")]
    most = str(max(clients))

    ours = [sys.executable, "-m", "orthrus_mlx", "server", "--model", args.model, "--block-size", args.block_size]
    with tempfile.TemporaryDirectory() as folder:
        servers = {
            "ours, batched": ours + ["--decode-concurrency", most],
            "ours, one at a time": ours,
            "mlx_lm.server": [sys.executable, "-m", "mlx_lm", "server", "--model",
                              str(mlx_lm_folder(args.model, Path(folder))), "--decode-concurrency", most],
        }
        if args.no_mlx_lm:
            servers.pop("mlx_lm.server")
        table = {}
        for name, command in servers.items():
            port = free_port()
            process = start(command + ["--port", str(port)], port)
            try:
                ask(port, "Hello.", 4)  # warm-up: compiled passes, step costs
                table[name] = [round_of(port, c, args.requests_per_client, args.max_tokens, args.mixed)
                               for c in clients]
            finally:
                process.send_signal(signal.SIGTERM)
                process.wait(timeout=120)
            for row in table[name]:
                print(f"{name:>20} {row['clients']} clients: {row['tokens_per_s']:6.2f} tok/s, "
                      f"p50 {row['p50_s']:6.1f} s, p95 {row['p95_s']:6.1f} s", flush=True)

    alone = {r["clients"]: r for r in table["ours, one at a time"]}
    for row in table["ours, batched"]:
        row["vs_one_at_a_time"] = round(row["tokens_per_s"] / alone[row["clients"]]["tokens_per_s"], 2)
        row["identical_to_one_at_a_time"] = row["answers"] == alone[row["clients"]]["answers"]
        print(f"batched / one at a time at {row['clients']} clients: {row['vs_one_at_a_time']}x, "
              f"answers identical: {row['identical_to_one_at_a_time']}")
    if args.json:
        args.json.write_text(json.dumps({"model": args.model, "max_tokens": args.max_tokens, "mixed": args.mixed,
                                         "block_size": args.block_size, "servers": table}, indent=1) + "\n")


if __name__ == "__main__":
    main()
