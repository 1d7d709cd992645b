"""Peak memory of Orthrus decoding against plain AR decoding at a 4K-token context.

The diffusion view reads the AR cache and keeps nothing of its own (docs/DESIGN.md section 2), so
Orthrus should need no more memory than AR beyond one step's activations. A random checkpoint
with a realistic KV size (hidden 512, 8 layers, 8 heads, 4 KV heads, head_dim 64) prefills a
4000-token prompt and generates 64 tokens; each mode runs in its own process so the peaks do
not mix. Reported: MLX's peak over the whole run (prefill included) and over decoding alone
(reset after the first token), and the process's peak RSS.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libopenblas.so.0 python benchmarks/memory_4k.py
"""

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

MODES = {"ar": {"use_diffusion": False}, "orthrus-32": {"block_size": 32}, "auto": {"block_size": "auto"}}
MB = 1e6


def config(context: int) -> dict:
    from orthrus_mlx.testing import tiny_config

    return tiny_config(
        hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
        num_key_value_heads=4, head_dim=64, max_position_embeddings=context, block_size=32,
    )


def child(args: argparse.Namespace) -> None:
    """One mode in this process: prefill, then decode; print the peaks as JSON."""
    import mlx.core as mx
    import numpy as np

    from orthrus_mlx.generate import mlx_generate
    from orthrus_mlx.loader import load_model

    model, _ = load_model(args.model, dtype=args.dtype)
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, 256, args.prompt_tokens).tolist()  # byte tokens, no EOS
    mx.reset_peak_memory()
    before = mx.get_active_memory()
    cache = model.make_cache()
    tokens = mlx_generate(
        model, prompt, eos_token_id=[], max_tokens=args.generate, prompt_cache=cache, **MODES[args.child]
    )
    next(tokens)  # the prefill
    prefill_peak = mx.get_peak_memory()
    mx.reset_peak_memory()
    n = 1 + sum(1 for _ in tokens)
    print(json.dumps({
        "mode": args.child,
        "generated": n,
        "weights_mb": before / MB,
        "peak_mb": max(prefill_peak, mx.get_peak_memory()) / MB,
        "decode_peak_mb": mx.get_peak_memory() / MB,
        "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MB,
        "kv_cache_mb": sum(c.nbytes for c in cache) / MB,
    }))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt-tokens", type=int, default=4000)
    parser.add_argument("--generate", type=int, default=64)
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--modes", default=",".join(MODES), help=f"subset of {','.join(MODES)}")
    parser.add_argument("--json", default=None, metavar="OUT")
    parser.add_argument("--child", choices=list(MODES), help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return 0

    from orthrus_mlx.testing import random_checkpoint

    context = args.prompt_tokens + args.generate
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = random_checkpoint(Path(tmp) / "model", config(max(4096, context)), seed=0)
        for mode in args.modes.split(","):
            cmd = [sys.executable, __file__, "--child", mode, "--model", str(path), "--dtype", args.dtype,
                   "--prompt-tokens", str(args.prompt_tokens), "--generate", str(args.generate)]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode != 0:
                print(f"{mode} failed:\n{out.stderr}", file=sys.stderr)
                continue
            results[mode] = json.loads(out.stdout.strip().splitlines()[-1])

    from orthrus_mlx.cli.bench import machine_note

    machine = machine_note()
    print(f"Peak memory at a {context}-token context ({args.dtype}; {machine})\n")
    print("| mode | weights MB | KV cache MB | peak MB (whole run) | peak MB (decoding) | max RSS MB "
          "| vs ar (decoding) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    ar = results.get("ar")
    for mode, r in results.items():
        ratio = f"{r['decode_peak_mb'] / ar['decode_peak_mb']:.3f}" if ar else "-"
        r["decode_ratio_to_ar"] = r["decode_peak_mb"] / ar["decode_peak_mb"] if ar else None
        r["ratio_to_ar"] = r["peak_mb"] / ar["peak_mb"] if ar else None
        cells = [r["weights_mb"], r["kv_cache_mb"], r["peak_mb"], r["decode_peak_mb"], r["max_rss_mb"]]
        print(f"| {mode} | " + " | ".join(f"{c:.1f}" for c in cells) + f" | {ratio} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "context": context, "dtype": args.dtype, "modes": results}, f, indent=2)
    return 0 if len(results) == len(args.modes.split(",")) else 1


if __name__ == "__main__":
    sys.exit(main())
