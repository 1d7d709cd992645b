"""Time to first token when a long conversation comes back to `orthrus-mlx server`: from a full
prefill, from the disk tier after the conversation was evicted from memory, and from the disk
tier after a restart; the answers must be identical in all three.

Each server is its own process on 127.0.0.1 (model load not timed). The conversation is a
document of about --tokens tokens plus a question; its follow-ups carry the earlier answers.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libopenblas.so.0 OPENBLAS_NUM_THREADS=1 \\
        python benchmarks/prompt_disk.py --model smollm2 --tokens 4096 --json benchmarks/results/prompt_disk.json
"""

import argparse
import http.client
import json
import signal
import sys
import tempfile
import time
from pathlib import Path

from server_throughput import free_port, start  # this folder's: the same servers, started the same way

HOST = "127.0.0.1"
CHAT = "/v1/chat/completions"
WORDS = ("river", "valley", "harbour", "mill", "bridge", "orchard", "market", "tower", "canal", "forest")


def document(tokens: int) -> str:
    """Plain sentences, about `tokens` tokens for a BPE tokenizer (~21 per sentence)."""
    sentences = []
    for i in range(tokens // 21):
        a, b, c = WORDS[i % 10], WORDS[(i * 3 + 1) % 10], WORDS[(i * 7 + 2) % 10]
        sentences.append(f"In year {1700 + i} the {a} near the {b} was sold to the {c} guild.")
    return " ".join(sentences)


class Server:
    def __init__(self, model: str, port: int, *flags: str):
        command = [sys.executable, "-m", "orthrus_mlx", "server", "--model", model, "--port", str(port),
                   "--max-tokens", "16", "--block-size", "4", *flags]
        self.port = port
        self.process = start(command, port)

    def ask(self, messages) -> tuple:
        """(seconds to the first content chunk, whole answer, cached prompt tokens)."""
        body = json.dumps({"messages": messages, "max_tokens": 16, "stream": True,
                           "stream_options": {"include_usage": True}})
        conn = http.client.HTTPConnection(HOST, self.port, timeout=3600)
        sent = time.perf_counter()
        conn.request("POST", CHAT, body=body, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        first, text, usage = None, "", {}
        for line in response:
            line = line.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[len("data: "):])
            if event.get("usage"):
                usage = event["usage"]
            for choice in event.get("choices", []):
                piece = choice["delta"].get("content")
                if piece:
                    first = first or time.perf_counter() - sent
                    text += piece
        conn.close()
        return first, text, usage.get("prompt_tokens_details", {}).get("cached_tokens", 0), usage.get("prompt_tokens")

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)  # writes its caches to the disk tier
        self.process.wait(timeout=600)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    question = [{"role": "user", "content": document(args.tokens) + "\n\nWho bought the first mill?"}]
    other = [{"role": "user", "content": "Say hello."}]
    rows = {}
    with tempfile.TemporaryDirectory() as folder:
        plain = Server(args.model, free_port())
        seconds, first_answer, _, prompt_tokens = plain.ask(question)
        rows["full prefill"] = dict(ttft_s=seconds, prompt_tokens=prompt_tokens, cached=0)
        follow_up = question + [{"role": "assistant", "content": first_answer},
                                {"role": "user", "content": "And the last one?"}]
        third = follow_up + [{"role": "assistant", "content": plain.ask(follow_up)[1]},
                             {"role": "user", "content": "Thank you."}]
        expected = {"follow-up": plain.ask(follow_up)[1], "third": plain.ask(third)[1]}
        plain.stop()

        disk = ["--prompt-cache-dir", folder, "--prompt-cache-size", "1"]
        tiered = Server(args.model, free_port(), *disk)
        tiered.ask(question)
        tiered.ask(other)  # evicts the long conversation to disk
        seconds, answer, cached, prompt_tokens = tiered.ask(follow_up)
        rows["after eviction"] = dict(ttft_s=seconds, prompt_tokens=prompt_tokens, cached=cached,
                                      identical=answer == expected["follow-up"])
        tiered.stop()
        restarted = Server(args.model, free_port(), *disk)
        seconds, answer, cached, prompt_tokens = restarted.ask(third)
        rows["after restart"] = dict(ttft_s=seconds, prompt_tokens=prompt_tokens, cached=cached,
                                     identical=answer == expected["third"])
        restarted.stop()
        on_disk = sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file())

    full = rows["full prefill"]["ttft_s"]
    for name, row in rows.items():
        row["speedup"] = round(full / row["ttft_s"], 1)
        print(f"{name:>15}: TTFT {row['ttft_s']:.2f} s ({row['speedup']}x), prompt {row['prompt_tokens']} "
              f"tokens, {row['cached']} cached, identical {row.get('identical', '-')}")
    print(f"disk tier after the run: {on_disk / 1e6:.1f} MB")
    if args.json:
        args.json.write_text(json.dumps({"model": args.model, "tokens": args.tokens, "rows": rows,
                                         "disk_bytes": on_disk}, indent=1) + "\n")


if __name__ == "__main__":
    main()
