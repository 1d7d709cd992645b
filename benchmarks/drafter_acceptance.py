"""Acceptance of a drafter adapter on held-out chat prompts, greedy, at several block lengths.

    python benchmarks/drafter_acceptance.py --model smollm2 --drafter DIR [--drafter DIR8 ...]

For every prompt (rendered with the chat template) the base's plain AR decoding is the reference;
each drafter and block length K must reproduce it token for token. Reports mean tokens per step
(accepted drafts + 1), the histogram of tokens per step, and whether every output was identical.
With --temperature > 0 the outputs are samples (seeded per prompt), so only acceptance is
reported: that sampling keeps the base's distribution is tests/test_sampling.py's job.
"""

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

from orthrus_mlx import DecodeStats, load, mlx_generate
from orthrus_mlx.cli.flags import chat_prompt


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--drafter", action="append", required=True, help="adapter folder (repeatable)")
    p.add_argument("--prompts", default=None, help="JSON list (default: the first drafter's heldout_prompts.json)")
    p.add_argument("--num-prompts", type=int, default=24)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--block-sizes", default="4,8,16")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0, help="prompt i samples with seed + i")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    prompts_file = Path(args.prompts or Path(args.drafter[0]) / "heldout_prompts.json")
    texts = json.loads(prompts_file.read_text())[: args.num_prompts]
    sizes = [int(k) for k in args.block_sizes.split(",")]

    report = {"model": args.model, "prompts": str(prompts_file), "num_prompts": len(texts),
              "max_tokens": args.max_tokens, "temperature": args.temperature, "drafters": {}}
    sampled = args.temperature > 0
    reference = None
    for drafter in args.drafter:
        model, tokenizer = load(args.model, drafter=drafter)
        prompts = [chat_prompt(tokenizer, [{"role": "user", "content": t}], {}) for t in texts]
        if reference is None and not sampled:
            reference = [list(mlx_generate(model, q, max_tokens=args.max_tokens, use_diffusion=False)) for q in prompts]
        rows = {}
        for K in sizes:
            steps, identical = [], 0
            for i, q in enumerate(prompts):
                stats = DecodeStats()
                out = list(mlx_generate(model, q, max_tokens=args.max_tokens, block_size=K, stats=stats,
                                        temperature=args.temperature, seed=args.seed + i))
                identical += not sampled and out == reference[i]
                steps += stats.tokens_per_step
            rows[K] = {"tokens_per_step": sum(steps) / len(steps), "steps": len(steps),
                       "identical_to_ar": "sampled" if sampled else f"{identical}/{len(prompts)}",
                       "histogram": dict(sorted(Counter(steps).items()))}
            print(f"{drafter} K={K}: {rows[K]['tokens_per_step']:.2f} tokens/step, "
                  f"identical {rows[K]['identical_to_ar']}, histogram {rows[K]['histogram']}", flush=True)
        report["drafters"][drafter] = rows
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
