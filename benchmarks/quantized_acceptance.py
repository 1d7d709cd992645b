"""Does quantization keep drafting alive? Mean tokens per step of each quantized variant.

Converts the model (default: the shipped tiny one) to bf16, 8-bit, 4-bit, 4-bit base with an
8-bit diffusion view and 4-bit base with an unquantized diffusion view, then decodes the
held-out prompts greedily with each and prints a markdown table: tokens per step, and how
often Orthrus output equals plain AR greedy decoding of the *same* model.

    python benchmarks/quantized_acceptance.py [--model PATH] [--max-tokens 64]
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

import mlx.core as mx

from orthrus_convert import convert
from orthrus_mlx import DecodeStats, load, mlx_generate
from orthrus_mlx.loader import DEFAULT_MODEL
from orthrus_mlx.testing import random_checkpoint, tiny_config

# name -> convert() options; the source itself is measured too, as loaded.
VARIANTS: Dict[str, Optional[dict]] = {
    "source (as shipped)": None,
    "bf16": dict(dtype="bfloat16"),
    "8-bit": dict(dtype="bfloat16", quantize=True, q_bits=8),
    "4-bit": dict(dtype="bfloat16", quantize=True, q_bits=4),
    "4-bit base, 8-bit diffusion view": dict(dtype="bfloat16", quantize=True, q_bits=4, diffusion_bits=8),
    "4-bit base, bf16 diffusion view": dict(dtype="bfloat16", quantize=True, q_bits=4, diffusion_bits=0),
}
FALLBACK_PROMPTS = ["The quick brown fox", "def main():\n    ", "Once upon a time", "1, 2, 3, 4,"]


def read_prompts(file: Path, count: int) -> List[str]:
    if not file.is_file():
        return FALLBACK_PROMPTS[:count]
    prompts = json.loads(file.read_text())
    return [p["text"] if isinstance(p, dict) else str(p) for p in prompts][:count]


def common_prefix(a: List[int], b: List[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def measure(path: Path, prompts: List[str], max_tokens: int) -> dict:
    model, tokenizer = load(path)
    steps: List[int] = []
    identical, agree, total, seconds = 0, 0, 0, 0.0
    for text in prompts:
        ids = tokenizer.encode(text)
        stats = DecodeStats()
        tic = time.perf_counter()
        orthrus = list(mlx_generate(model, ids, max_tokens=max_tokens, stats=stats))
        seconds += time.perf_counter() - tic
        ar = list(mlx_generate(model, ids, max_tokens=max_tokens, use_diffusion=False))
        steps += stats.tokens_per_step
        identical += orthrus == ar
        agree += common_prefix(orthrus, ar)
        total += max(len(orthrus), len(ar))
    size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    return {
        "tokens_per_step": sum(steps) / max(1, len(steps)),
        "identical": identical,
        "prompts": len(prompts),
        "agreement": agree / max(1, total),
        "size_mb": size / 1e6,
        "seconds": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(DEFAULT_MODEL), help="HF-layout model folder.")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--prompts", type=int, default=32, help="How many held-out prompts.")
    parser.add_argument(
        "--prompts-file", default=None, help="Default: heldout_prompts.json beside the model."
    )
    parser.add_argument("--q-group-size", type=int, default=64)
    parser.add_argument("--output", default=None, help="Also write the table to this markdown file.")
    args = parser.parse_args()

    work = tempfile.TemporaryDirectory(prefix="orthrus-quant-")
    model_path = Path(args.model)
    note = f"model: {model_path}"
    if not (model_path / "config.json").is_file():
        # No trained model yet: prove the script works on a random one (drafts are noise there).
        config = tiny_config(hidden_size=128, head_dim=32, intermediate_size=256)
        model_path = random_checkpoint(Path(work.name) / "random", config)
        note = f"{args.model} not found: a RANDOM tiny checkpoint (drafting numbers are meaningless)"
    prompts_file = Path(args.prompts_file) if args.prompts_file else model_path / "heldout_prompts.json"
    prompts = read_prompts(prompts_file, args.prompts)

    rows = []
    for name, options in VARIANTS.items():
        path = model_path
        if options is not None:
            if options.get("quantize"):
                options = dict(options, q_group_size=args.q_group_size)
            path = convert(model_path, Path(work.name) / name.replace(" ", "_").replace(",", ""),
                           progress=False, **options)
        result = measure(path, prompts, args.max_tokens)
        rows.append((name, result))
        print(f"{name}: {result['tokens_per_step']:.2f} tokens/step", file=sys.stderr)
        mx.clear_cache()

    lines = [
        f"{note}; {len(prompts)} prompts, greedy, max {args.max_tokens} tokens, "
        f"group size {args.q_group_size}, `mlx_generate` on {mx.default_device()}",
        "",
        "| variant | weights (MB) | mean tokens / step | Orthrus output == AR greedy of the same model "
        "| token agreement with AR |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, r in rows:
        lines.append(
            f"| {name} | {r['size_mb']:.2f} | {r['tokens_per_step']:.2f} "
            f"| {r['identical']}/{r['prompts']} | {100 * r['agreement']:.1f}% |"
        )
    table = "\n".join(lines)
    print(table)
    if args.output:
        Path(args.output).write_text(table + "\n")
    work.cleanup()


if __name__ == "__main__":
    main()
