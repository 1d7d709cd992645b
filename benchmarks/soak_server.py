"""A bounded soak of `orthrus-mlx server` on 127.0.0.1: mixed valid, hostile and abandoned requests.

The server runs as its own process (the shipped model unless --model is given, `--block-size auto`
as users run it). Worker threads send requests until --requests are done or --seconds have passed:
greedy text and chat completions, whole and streamed, over prompts that share prefixes (so the
prompt-cache pool forks and evicts), seeded samples, hostile bodies and request lines, and clients
that vanish mid-stream or mid-body. It checks that the server never dies and /health answers, that
every valid answer equals a fresh in-process `generate` of the same prompt, that every hostile one
gets its JSON 4xx, that no connection is reset, and it samples the server's RSS.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libopenblas.so.0 OPENBLAS_NUM_THREADS=1 \\
        python benchmarks/soak_server.py --requests 3000 --concurrency 8 --seconds 600
"""

import argparse
import json
import os
import random
import re
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

HOST = "127.0.0.1"  # loopback only
MAX_TOKENS = 16
CHAT, TEXT = "/v1/chat/completions", "/v1/completions"
SAMPLING = {"temperature": 0.8, "top_p": 0.95}


def http(port: int, method: str, path: str, body: bytes = b"", headers: str = None, timeout: float = 120):
    """(status, body text) over a fresh connection; the request as raw bytes."""
    if headers is None:
        headers = f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    data = f"{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{headers}\r\n".encode() + body
    with socket.create_connection((HOST, port), timeout=timeout) as s:
        s.sendall(data)
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
    head, _, text = reply.partition(b"\r\n\r\n")
    return int(head.split()[1]), text.decode("utf-8", "replace")


def streamed_text(body: str, chat: bool) -> tuple:
    """(text, ended with [DONE]) of an SSE answer."""
    events = [e[len("data: "):] for e in body.split("\n\n") if e.startswith("data: ")]
    done = bool(events) and events[-1] == "[DONE]"
    text = ""
    for e in events:
        if e == "[DONE]":
            continue
        for choice in json.loads(e)["choices"]:
            text += choice["delta"].get("content", "") if chat else choice["text"]
    return text, done


def prompts(model_path: Path, tokenizer) -> dict:
    """Text prompts (two cuts of each held-out file, sharing a prefix) and chat conversations."""
    heldout = model_path / "heldout_prompts.json"
    if heldout.is_file():
        texts = [p["text"] for p in json.loads(heldout.read_text())]
    else:
        texts = [f"def function_{i}(x):\n    return x * {i}\n" * 3 for i in range(16)]
    text = texts + [t[: len(t) * 2 // 3] for t in texts]
    system = {"role": "system", "content": "You write short Python snippets."}
    chats = [[{"role": "user", "content": f"Write a function about {w}."}] for w in ("lists", "files", "dates")]
    chats += [[system, {"role": "user", "content": f"Question {i}: how do I sort a dict?"}] for i in range(4)]
    chats += [[system, {"role": "user", "content": "Hi."}, {"role": "assistant", "content": "def hi(): pass"},
               {"role": "user", "content": f"Again, variant {i}."}] for i in range(3)]
    return {"text": text, "chat": chats}


def expected_answers(model_path: Path, seeds: list) -> tuple:
    """Fresh `generate` of every prompt: greedy for all, seeded samples for a few text prompts."""
    from orthrus_mlx import generate, load
    from orthrus_mlx.cli.flags import chat_prompt

    model, tokenizer = load(model_path)
    pool = prompts(model_path, tokenizer)
    greedy = {("text", i): generate(model, tokenizer, p, max_tokens=MAX_TOKENS) for i, p in enumerate(pool["text"])}
    for i, messages in enumerate(pool["chat"]):
        greedy[("chat", i)] = generate(model, tokenizer, chat_prompt(tokenizer, messages, {}), max_tokens=MAX_TOKENS)
    sampled = {
        (i, seed): generate(model, tokenizer, pool["text"][i], max_tokens=MAX_TOKENS, seed=seed, **SAMPLING)
        for i in range(4) for seed in seeds
    }
    return pool, greedy, sampled


def hostile_requests(port: int) -> list:
    """(name, send) pairs; send() -> (status, body) of one hostile request."""
    ok = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}

    def body(path, data):
        return lambda: http(port, "POST", path, data if isinstance(data, bytes) else json.dumps(data).encode())

    def literal(field, value):
        return (json.dumps(ok)[:-1] + f', "{field}": {value}}}').encode()

    return [
        ("bad json", body(CHAT, b'{"messages": ['), 400),
        ("int beyond 2**64", body(CHAT, literal("temperature", "9" * 29)), 400),
        ("NaN", body(CHAT, literal("temperature", "NaN")), 400),
        ("float overflow", body(CHAT, literal("top_p", "1e999")), 400),
        ("deep nesting", body(CHAT, b"[" * 50_000), 400),
        ("lone surrogate", body(TEXT, b'{"prompt": "a\\ud800"}'), 400),
        ("template override", body(CHAT, dict(ok, chat_template_kwargs={"chat_template": "{{ 'x' * 3000000 }}"})), 400),
        ("tokenize keyword", body(CHAT, dict(ok, chat_template_kwargs={"tokenize": True})), 400),
        ("wrong type", body(CHAT, dict(ok, max_tokens="5")), 400),
        ("over the context", body(CHAT, dict(ok, max_tokens=10**6)), 400),
        ("token id out of the vocabulary", body(TEXT, {"prompt": [1, 10**9]}), 400),
        ("unknown route", body("/v1/nothing", ok), 404),
        ("unsupported method", lambda: http(port, "PUT", "/v1/models", b"", ""), 501),
        ("control characters", lambda: http(port, "GET", "/a\x1b[31m\rx", b"", ""), 400),
        ("bad Content-Length", lambda: http(port, "POST", TEXT, b"{}", "Content-Length: +2\r\n"), 400),
        ("no Content-Length", lambda: http(port, "POST", TEXT, b"", ""), 411),
    ]


def oversized(port: int):
    return http(port, "POST", CHAT, b'{"padding": "' + b"x" * (1 << 20) + b'"}')


def vanish_mid_stream(port: int, prompt: str) -> None:
    """Start a long streamed answer, read its first event, then reset the connection."""
    body = json.dumps({"prompt": prompt, "max_tokens": 200, "stream": True}).encode()
    head = f"POST {TEXT} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n".encode()
    with socket.create_connection((HOST, port), timeout=120) as s:
        s.sendall(head + body)
        received = b""
        while b"data: " not in received:
            chunk = s.recv(4096)
            if not chunk:
                break
            received += chunk
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def vanish_mid_body(port: int) -> None:
    """Promise 100 bytes, send 10, reset."""
    with socket.create_connection((HOST, port), timeout=120) as s:
        s.sendall(f"POST {TEXT} HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n".encode() + b'{"prompt":')
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


KINDS = {  # weight of each kind of request
    "text": 25, "text-streamed": 12, "chat": 12, "chat-streamed": 6, "sampled": 5,
    "hostile": 25, "oversized": 1, "vanish-mid-stream": 9, "vanish-mid-body": 5,
}


class Soak:
    def __init__(self, port: int, pool: dict, greedy: dict, sampled: dict, seeds: list):
        self.port, self.pool, self.greedy, self.sampled, self.seeds = port, pool, greedy, sampled, seeds
        self.hostile = hostile_requests(port)
        self.counts, self.failures = Counter(), []
        self.lock = threading.Lock()

    def fail(self, kind: str, what: str) -> None:
        with self.lock:
            self.failures.append(f"{kind}: {what}"[:300])

    def one(self, rng: random.Random) -> None:
        kind = rng.choices(list(KINDS), weights=list(KINDS.values()))[0]
        try:
            self.run(kind, rng)
        except Exception as e:  # a reset, a refusal, a timeout, a garbled answer: none is acceptable
            self.fail(kind, f"{type(e).__name__}: {e}")
        with self.lock:
            self.counts[kind] += 1

    def run(self, kind: str, rng: random.Random) -> None:
        port = self.port
        if kind in ("text", "text-streamed", "chat", "chat-streamed"):
            chat, stream = kind.startswith("chat"), kind.endswith("streamed")
            i = rng.randrange(len(self.pool["chat" if chat else "text"]))
            key = ("chat", i) if chat else ("text", i)
            body = {"max_tokens": MAX_TOKENS, "stream": stream}
            body.update({"messages": self.pool["chat"][i]} if chat else {"prompt": self.pool["text"][i]})
            status, reply = http(port, "POST", CHAT if chat else TEXT, json.dumps(body).encode())
            if status != 200:
                return self.fail(kind, f"status {status}: {reply[:200]}")
            if stream:
                text, done = streamed_text(reply, chat)
                if not done:
                    return self.fail(kind, "no [DONE]")
            else:
                choice = json.loads(reply)["choices"][0]
                text = choice["message"]["content"] if chat else choice["text"]
            if text != self.greedy[key]:
                self.fail(kind, f"prompt {key}: {text!r} != {self.greedy[key]!r}")
        elif kind == "sampled":
            i, seed = rng.randrange(4), rng.choice(self.seeds)
            body = dict(SAMPLING, prompt=self.pool["text"][i], max_tokens=MAX_TOKENS, seed=seed)
            status, reply = http(port, "POST", TEXT, json.dumps(body).encode())
            if status != 200 or json.loads(reply)["choices"][0]["text"] != self.sampled[(i, seed)]:
                self.fail(kind, f"prompt {i} seed {seed}: {status} {reply[:200]}")
        elif kind in ("hostile", "oversized"):
            big = ("oversized", lambda: oversized(port), 413)
            name, send, want = rng.choice(self.hostile) if kind == "hostile" else big
            status, reply = send()
            if status != want or "error" not in json.loads(reply):
                self.fail(kind, f"{name}: {status} {reply[:200]}")
        elif kind == "vanish-mid-stream":
            vanish_mid_stream(port, rng.choice(self.pool["text"]))
        elif kind == "vanish-mid-body":
            vanish_mid_body(port)


def rss_kb(pid: int, field: str = "VmRSS") -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(rf"{field}:\s+(\d+)", status).group(1))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="Model folder (default: the shipped orthrus-tiny)")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=300, help="Stop sending new requests after this")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="Write the figures here as JSON")
    args = parser.parse_args()

    from orthrus_mlx.loader import DEFAULT_MODEL

    model_path = Path(args.model) if args.model else DEFAULT_MODEL
    seeds = [1, 2, 3]
    print("fresh generate of every prompt ...", flush=True)
    pool, greedy, sampled = expected_answers(model_path, seeds)

    home = tempfile.mkdtemp(prefix="soak-")
    env = dict(os.environ, HOME=home, ORTHRUS_MLX_CACHE=home, PYTHONUNBUFFERED="1")
    log_path = Path(home) / "server.log"
    with open(log_path, "wb") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "orthrus_mlx", "server", "--model", str(model_path), "--host", HOST,
             "--port", "0", "--max-tokens", str(MAX_TOKENS)],
            stdout=log, stderr=subprocess.STDOUT, env=env,
        )
    try:
        deadline = time.time() + 120
        while not (m := re.search(r"on http://[\d.]+:(\d+)", log_path.read_text())):
            if server.poll() is not None or time.time() > deadline:
                raise SystemExit(f"the server did not start:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.2)
        port = int(m.group(1))
        soak = Soak(port, pool, greedy, sampled, seeds)
        warm = random.Random(-1)
        for kind in KINDS:  # calibration, first traces, every code path once
            soak.run(kind, warm)
        rss = {"start": rss_kb(server.pid)}
        samples = [rss["start"]]

        issued, issue_lock, stop = [0], threading.Lock(), time.time() + args.seconds

        def worker(w: int) -> None:
            rng = random.Random(args.seed * 1000 + w)
            while time.time() < stop:
                with issue_lock:
                    if issued[0] >= args.requests:
                        return
                    issued[0] += 1
                soak.one(rng)

        def monitor() -> None:
            while any(t.is_alive() for t in workers):
                samples.append(rss_kb(server.pid))
                time.sleep(0.5)

        tic = time.time()
        workers = [threading.Thread(target=worker, args=(w,)) for w in range(args.concurrency)]
        for t in workers:
            t.start()
        watcher = threading.Thread(target=monitor)
        watcher.start()
        for t in workers:
            t.join()
        watcher.join()
        seconds = time.time() - tic
        alive = server.poll() is None
        health = http(port, "GET", "/health", b"", "")[0] if alive else None
        time.sleep(2)  # let the last disconnected generations finish
        rss.update(peak=max(samples), end=rss_kb(server.pid), high_water_mark=rss_kb(server.pid, "VmHWM"))
    finally:
        server.terminate()
        server.wait(timeout=30)
    log_text = log_path.read_text()
    result = {
        "command": "python benchmarks/soak_server.py " + " ".join(sys.argv[1:]),
        "model": model_path.name,
        "requests": sum(soak.counts.values()),
        "by_kind": dict(soak.counts),
        "concurrency": args.concurrency,
        "seconds": round(seconds, 1),
        "failures": len(soak.failures),
        "first_failures": soak.failures[:10],
        "server_alive": alive,
        "health_status": health,
        "server_tracebacks": log_text.count("Traceback"),
        "generation_failures_logged": log_text.count("generation failed"),
        "disconnects_logged": log_text.count("client disconnected"),
        "rss_mb": {k: round(v / 1024, 1) for k, v in rss.items()},
        "rss_mb_every_tenth_of_the_run": [round(samples[i * (len(samples) - 1) // 10] / 1024, 1) for i in range(11)],
    }
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    ok = alive and health == 200 and not soak.failures and not result["server_tracebacks"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
