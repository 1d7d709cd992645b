"""Peak memory of `orthrus-convert -q` on a synthetic multi-GB checkpoint.

Writes random bf16 tensors in the Orthrus/Qwen3 layout (Qwen3-1.7B widths, as many layers
as fit the requested size) as several shards, converts them to 4-bit in a child process,
and reports the child's peak RSS against the checkpoint's size and its largest tensor.

    python benchmarks/convert_memory.py --size-gb 3
"""

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx

# Qwen3-1.7B's widths (and vocabulary), with the diffusion view.
WIDTHS = dict(
    hidden_size=2048, intermediate_size=6144, num_attention_heads=16, num_key_value_heads=8,
    head_dim=128, vocab_size=151936,
)
GB = 1 << 30


def synthetic_config(size_gb: float) -> dict:
    d, ff, hd = WIDTHS["hidden_size"], WIDTHS["intermediate_size"], WIDTHS["head_dim"]
    nq, nkv = WIDTHS["num_attention_heads"], WIDTHS["num_key_value_heads"]
    attention = 2 * (2 * nq * hd * d + 2 * nkv * hd * d)  # both views
    per_layer = 2 * (attention + 3 * d * ff)  # bf16 bytes
    embed = 2 * WIDTHS["vocab_size"] * d
    layers = max(1, round((size_gb * GB - embed) / per_layer))
    return dict(
        architectures=["OrthrusLM"], model_type="qwen3", num_hidden_layers=layers,
        rms_norm_eps=1e-6, rope_theta=1e6, max_position_embeddings=4096,
        tie_word_embeddings=True, torch_dtype="bfloat16", block_size=32,
        mask_token_id=151669, eos_token_id=151645, **WIDTHS,
    )


def tensor_shapes(config: dict) -> dict:
    d, ff, hd = config["hidden_size"], config["intermediate_size"], config["head_dim"]
    nq, nkv = config["num_attention_heads"], config["num_key_value_heads"]
    shapes = {"model.embed_tokens.weight": (config["vocab_size"], d), "model.norm.weight": (d,)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        for view in ("", "_diff"):
            shapes.update({
                f"{p}self_attn.q_proj{view}.weight": (nq * hd, d),
                f"{p}self_attn.k_proj{view}.weight": (nkv * hd, d),
                f"{p}self_attn.v_proj{view}.weight": (nkv * hd, d),
                f"{p}self_attn.o_proj{view}.weight": (d, nq * hd),
                f"{p}self_attn.q_norm{view}.weight": (hd,),
                f"{p}self_attn.k_norm{view}.weight": (hd,),
            })
        shapes.update({
            f"{p}mlp.gate_proj.weight": (ff, d), f"{p}mlp.up_proj.weight": (ff, d),
            f"{p}mlp.down_proj.weight": (d, ff), f"{p}input_layernorm.weight": (d,),
            f"{p}post_attention_layernorm.weight": (d,),
        })
    return shapes


def write_checkpoint(path: Path, config: dict, shard_gb: float) -> int:
    """Random bf16 shards of at most `shard_gb`, written one shard at a time; returns bytes."""
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    shards, current, size = [], {}, 0
    for name, shape in tensor_shapes(config).items():
        n = 2
        for s in shape:
            n *= s
        if current and size + n > shard_gb * GB:
            shards.append(current)
            current, size = {}, 0
        current[name], size = shape, size + n
    shards.append(current)
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        arrays = {k: (mx.random.normal(s) * 0.02).astype(mx.bfloat16) for k, s in shard.items()}
        mx.eval(arrays)
        mx.save_safetensors(str(path / file), arrays, metadata={"format": "pt"})
        del arrays
        weight_map.update({k: file for k in shard})
        total += (path / file).stat().st_size
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return total


# The converter in a fresh process that reports its own peak RSS in bytes. On Linux from
# VmHWM, which starts afresh at exec; ru_maxrss would also count the parent's pages at fork.
MEASURED_RUN = """
import json, resource, sys
from orthrus_convert.cli import main
argv = json.loads(sys.argv[1])
assert argv == [] or main(argv) == 0
try:
    status = open("/proc/self/status").read()
    print(int(next(l for l in status.splitlines() if l.startswith("VmHWM:")).split()[1]) * 1024)
except OSError:
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)  # macOS: bytes
"""


def check_output(src: Path, out: Path) -> None:
    """The output loads as a quantized model whose embedding is the source's, quantized."""
    from orthrus_mlx.loader import load_model

    model, _ = load_model(out, lazy=True)
    embed = model.model.embed_tokens
    w, scales, biases = embed.weight[:64], embed.scales[:64], embed.biases[:64]
    rows = mx.dequantize(w, scales, biases, embed.group_size, embed.bits)
    weight_map = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
    name = "model.embed_tokens.weight"
    source = mx.load(str(src / weight_map[name]))[name][:64]
    step = mx.abs(mx.repeat(scales, embed.group_size, axis=-1))
    if not mx.all(mx.abs(rows - source) <= step * 1.01 + 1e-3).item():
        raise AssertionError(f"{out}: the quantized embedding does not match the source")


def folder_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-gb", type=float, default=3.0, help="Checkpoint size (default 3).")
    parser.add_argument("--shard-gb", type=float, default=1.0, help="Input shard size (default 1).")
    parser.add_argument("--q-bits", type=int, default=4)
    parser.add_argument("--workdir", default=None, help="Where to write (default: a folder in /tmp).")
    parser.add_argument(
        "--keep", action="store_true", help="Keep the files afterwards (a later run reuses the checkpoint)."
    )
    args = parser.parse_args()

    work = Path(args.workdir or tempfile.mkdtemp(prefix="orthrus-convert-mem-"))
    src, out = work / "hf", work / "mlx"
    try:
        config = synthetic_config(args.size_gb)
        tic = time.perf_counter()
        if (src / "config.json").is_file():  # a checkpoint kept by an earlier --keep run
            config = json.loads((src / "config.json").read_text())
            size = folder_size(src)
        else:
            size = write_checkpoint(src, config, args.shard_gb)
        shutil.rmtree(out, ignore_errors=True)
        shards = len(list(src.glob("*.safetensors")))
        print(f"synthetic checkpoint: {size / GB:.2f} GiB in {shards} shards, "
              f"{config['num_hidden_layers']} layers ({time.perf_counter() - tic:.0f} s to write)")
        largest = max(2 * s[0] * (s[1] if len(s) > 1 else 1) for s in tensor_shapes(config).values())

        argv = ["--hf-path", str(src), "--mlx-path", str(out), "-q", "--q-bits", str(args.q_bits),
                "--no-progress"]
        tic = time.perf_counter()
        result = subprocess.run(
            [sys.executable, "-c", MEASURED_RUN, json.dumps(argv)],
            check=True, stdout=subprocess.PIPE, text=True,
        )
        seconds = time.perf_counter() - tic
        peak = int(result.stdout.strip().splitlines()[-1])
        baseline = subprocess.run(
            [sys.executable, "-c", MEASURED_RUN, "[]"], check=True, stdout=subprocess.PIPE, text=True
        )
        idle = int(baseline.stdout.strip().splitlines()[-1])
        check_output(src, out)
        print(f"| checkpoint | largest tensor | output ({args.q_bits}-bit) | peak RSS of the converter "
              "| of which Python + mlx imports | time |")
        print("| --- | --- | --- | --- | --- | --- |")
        print(f"| {size / GB:.2f} GiB bf16, {shards} shards | {largest / GB:.2f} GiB "
              f"| {folder_size(out) / GB:.2f} GiB | {peak / GB:.2f} GiB "
              f"({100 * peak / size:.0f}% of the checkpoint) | {idle / GB:.2f} GiB | {seconds:.0f} s |")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
