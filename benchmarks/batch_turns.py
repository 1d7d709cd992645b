"""Time to first token of a conversation's second turn under `--decode-concurrency 4`: several
clients side by side, each with its own document, ask a question, then a follow-up. The server
that saw turn 1 takes each follow-up's prefix from its prompt cache pool; a fresh server given
the same follow-ups prefills them whole (what every batched request did before the batch used
the pool). The answers must be identical.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libopenblas.so.0 OPENBLAS_NUM_THREADS=1 \\
        python benchmarks/batch_turns.py --model smollm2 --clients 2 --tokens 400 \\
        --json benchmarks/results/batch_turns.json
"""

import argparse
import json
import threading
from pathlib import Path

from prompt_disk import Server, document  # this folder's: the same servers, asked the same way
from server_throughput import free_port


def side_by_side(server: Server, conversations) -> list:
    """`server.ask` of every conversation at once: [(ttft_s, answer, cached, prompt_tokens)]."""
    results = [None] * len(conversations)

    def client(i: int) -> None:
        results[i] = server.ask(conversations[i])

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(conversations))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=400, help="each client's document, about")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    batched = ["--decode-concurrency", "4"]
    firsts = [[{"role": "user", "content": f"Report {c}. " + document(args.tokens) + "\n\nWho bought the first mill?"}]
              for c in range(args.clients)]
    warm = Server(args.model, free_port(), *batched)
    turn1 = side_by_side(warm, firsts)
    follow_ups = [first + [{"role": "assistant", "content": answer}, {"role": "user", "content": "And the last one?"}]
                  for first, (_, answer, _, _) in zip(firsts, turn1)]
    reused = side_by_side(warm, follow_ups)
    warm.stop()
    fresh = Server(args.model, free_port(), *batched)
    whole = side_by_side(fresh, follow_ups)
    fresh.stop()

    rows = {
        name: [dict(ttft_s=round(r[0], 2), cached=r[2], prompt_tokens=r[3]) for r in results]
        for name, results in (("turn 1", turn1), ("turn 2, pool", reused), ("turn 2, whole prefill", whole))
    }
    identical = [r[1] for r in reused] == [w[1] for w in whole]
    for name, row in rows.items():
        mean = sum(r["ttft_s"] for r in row) / len(row)
        print(f"{name:>22}: mean TTFT {mean:.2f} s; per client {row}")
    print(f"turn 2 answers identical with and without the pool: {identical}")
    if args.json:
        args.json.write_text(json.dumps({"model": args.model, "clients": args.clients, "tokens": args.tokens,
                                         "rows": rows, "identical": identical}, indent=1) + "\n")


if __name__ == "__main__":
    main()
