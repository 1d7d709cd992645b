"""`orthrus-mlx bench`: Orthrus against mlx-lm's own decoding of the same weights, in one process.

Modes, interleaved per prompt (A B A B ...) after one warm-up run of each:
  mlx-lm      mlx_lm's stream_generate on mlx-lm's plain Qwen3 (diffusion tensors dropped):
              what a user would otherwise run
  mlx-lm-4bit the same on 4-bit weights: a GGUF base's own (Q4_1 is MLX's 4-bit affine, group
              32), a float folder quantized by mlx-lm (group 64); other weights, other tokens
  ar          our stream_generate without drafting
  orthrus-K   our stream_generate with a fixed verify length K, one mode per --block-sizes entry
  auto        our stream_generate choosing the verify length step by step (block_size="auto")
Greedy only, so every mode must emit exactly mlx-lm's tokens; the bench checks that too.
Generation tok/s counts the tokens after the first over the time from the first token to the
last (the prefill is time to first token), the same for every mode.
"""

import argparse
import importlib.util
import json
import os
import platform
import statistics
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_lm.generate import stream_generate as mlx_lm_stream_generate

from .. import gguf
from ..backend import adaptive_block
from ..core.costs import user_store
from ..core.step import DecodeStats
from ..generate import stream_generate
from ..loader import DEFAULT_MODEL, DTYPES, load, locate
from ..named import default_dtype
from .flags import add_model_arguments, chat_prompt

MODES = ("mlx-lm", "mlx-lm-4bit", "ar", "orthrus", "auto")
BASELINES = ("mlx-lm", "mlx-lm-4bit")
PROMPTS_FILE = "heldout_prompts.json"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument(
        "--prompts",
        default=None,
        help=f"JSON list of prompts (strings, or objects with a 'text' field; "
        f"default: the model folder's {PROMPTS_FILE})",
    )
    parser.add_argument("--max-tokens", "-m", type=int, default=128, help="Tokens to generate per prompt")
    parser.add_argument("--num-prompts", type=int, default=8, help="Use the first N prompts")
    parser.add_argument("--repeats", type=int, default=2, help="Timed runs of every mode per prompt")
    parser.add_argument(
        "--block-sizes",
        default=None,
        help="Fixed verify lengths to sweep, e.g. 4,8,16,32 (default: powers of two up to the "
        "checkpoint's block_size, and the block_size itself)",
    )
    parser.add_argument(
        "--modes",
        default=",".join(MODES),
        help=f"Comma-separated subset of {','.join(MODES)} ('orthrus' is one mode per block size)",
    )
    parser.add_argument(
        "--random-diffusion",
        action="store_true",
        help="Replace the diffusion view's projections by random ones of the same scale (useless "
        "drafts: what the adaptive mode costs when drafting cannot pay)",
    )
    parser.add_argument(
        "--chat", action="store_true", help="Render each prompt as a user message with the chat template"
    )
    parser.add_argument("--json", default=None, metavar="OUT", help="Write every figure as JSON")
    parser.add_argument("--plot", default=None, metavar="OUT.png", help="Write a PNG of the figures")


@dataclass
class Run:
    """One timed generation."""

    tokens: List[int]
    ttft: float  # seconds from the call to the first token (the prefill)
    gen_time: float  # seconds from the first token to the last
    tokens_per_step: List[int]  # one entry per decoding step after the first token
    peak_bytes: int  # the run's peak memory, the mode's weights included


@dataclass
class Bench:
    model: object  # our Orthrus model
    base_models: Dict[str, object]  # per baseline mode, mlx-lm's plain model of the same base
    tokenizer: object
    max_tokens: int
    auto: object = "auto"  # the auto mode's one adaptive policy, over the user's stored step costs
    weight_bytes: Dict[str, int] = field(default_factory=dict)


def machine_note() -> str:
    """The line every reported figure carries: which hardware and backend measured it."""
    if mx.default_device() == mx.gpu and platform.system() == "Darwin":
        return f"macOS {platform.machine()}, MLX Metal (GPU) backend"
    preload = os.environ.get("LD_PRELOAD", "")
    blas = "OpenBLAS preloaded" if "openblas" in preload.lower() else "no OpenBLAS preload"
    threads = os.environ.get("OPENBLAS_NUM_THREADS")
    if threads and "openblas" in preload.lower():
        blas += f" ({threads} thread{'s' if threads != '1' else ''})"
    return f"{platform.system()} CPU, {os.cpu_count()} cores, MLX CPU backend, {blas}"


def parse_modes(text: str, block_sizes: List[int], has_diffusion: bool) -> List[str]:
    chosen = [m.strip() for m in text.split(",") if m.strip()]
    unknown = sorted(set(chosen) - set(MODES))
    if unknown or not chosen:
        raise ValueError(f"--modes must be a subset of {','.join(MODES)}, got {text!r}")
    modes = []
    for mode in MODES:  # a fixed order, whatever the flag's
        if mode not in chosen:
            continue
        if mode in ("orthrus", "auto") and not has_diffusion:
            continue  # a plain Qwen3 checkpoint: nothing to draft with
        modes += [f"orthrus-{k}" for k in block_sizes] if mode == "orthrus" else [mode]
    return modes


def parse_block_sizes(text: Optional[str], checkpoint_block_size: Optional[int]) -> List[int]:
    if text is None:
        top = checkpoint_block_size or 2
        sizes = {2**i for i in range(1, top.bit_length()) if 2**i <= top} | {top}
        return sorted(sizes)
    try:
        sizes = sorted({int(s) for s in text.split(",") if s.strip()})
    except ValueError:
        raise ValueError(f"--block-sizes must be integers like 4,8,16,32, got {text!r}") from None
    if not sizes or sizes[0] < 2:
        raise ValueError(f"--block-sizes must be >= 2 (1 is the ar mode), got {text!r}")
    return sizes


def load_prompts(path: Path) -> List[str]:
    with open(path) as f:
        data = json.load(f)
    if not isinstance(data, list) or not data:
        raise ValueError(f"{path}: expected a non-empty JSON list of prompts")
    return [p["text"] if isinstance(p, dict) else str(p) for p in data]


def load_mlx_lm_4bit(model_path: Path):
    """mlx-lm's model of the base on 4-bit weights: a GGUF's own when its layers are 4-bit, else
    mlx-lm's own 4-bit quantization (group 64) of the float weights."""
    import mlx.nn as nn

    if gguf.is_gguf(model_path) and gguf.read_gguf(model_path)[0].get("quantization", {}).get("bits") == 4:
        return load_mlx_lm_model(model_path, None)
    model = load_mlx_lm_model(model_path, "float16")
    if not any(isinstance(m, nn.QuantizedLinear) for _, m in model.named_modules()):
        nn.quantize(model, group_size=64, bits=4)
    return model


def load_mlx_lm_model(model_path: Path, dtype: Optional[str]):
    """mlx-lm's own model of the same base (strict=False drops a folder's diffusion tensors; a
    GGUF base is read with our GGUF reader into mlx-lm's class, dequantized when `dtype` is set)."""
    from mlx_lm.utils import dequantize_model, load_model

    if gguf.is_gguf(model_path):
        from mlx_lm.utils import _get_classes

        config, weights, _ = gguf.read_gguf(model_path)
        model_class, args_class = _get_classes(config)
        model = model_class(args_class.from_dict(config))
        if dtype is not None:  # dequantize through float32 scales, as our loader does
            weights = {k: v.astype(mx.float32) if k.endswith((".scales", ".biases")) else v for k, v in weights.items()}
        gguf.load_into(model, config, weights)
        if dtype is not None and "quantization" in config:
            model = dequantize_model(model)
    else:
        model, _ = load_model(model_path, strict=False)
    if dtype is not None:
        model.set_dtype(DTYPES[dtype])
    return model


def randomize_diffusion(model, seed: int = 0) -> None:
    """Useless drafts: every *_proj_diff matrix redrawn at random, scaled like the trained one."""
    key = mx.random.key(seed)
    new = []
    for name, p in tree_flatten(model.parameters()):
        if "_proj_diff" not in name:
            continue
        if not mx.issubdtype(p.dtype, mx.floating):
            raise ValueError("--random-diffusion needs an unquantized checkpoint")
        key, sub = mx.random.split(key)
        scale = mx.sqrt(mx.mean(mx.square(p.astype(mx.float32))))
        new.append((name, (mx.random.normal(p.shape, key=sub) * scale).astype(p.dtype)))
    model.load_weights(new, strict=False)
    mx.eval(model.parameters())


def weight_bytes(model) -> int:
    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


def mode_kwargs(mode: str, auto: object) -> dict:
    if mode == "ar":
        return {"use_diffusion": False}
    if mode == "auto":
        return {"block_size": auto}
    return {"block_size": int(mode.split("-")[1])}


def run_once(bench: Bench, mode: str, prompt: List[int]) -> Run:
    mx.clear_cache()
    mx.reset_peak_memory()
    before = mx.get_active_memory()
    stats = DecodeStats()
    if mode in BASELINES:
        responses = mlx_lm_stream_generate(
            bench.base_models[mode], bench.tokenizer, prompt, max_tokens=bench.max_tokens
        )
    else:
        responses = stream_generate(
            bench.model, bench.tokenizer, prompt, bench.max_tokens, stats=stats, **mode_kwargs(mode, bench.auto)
        )
    tokens, first, last = [], None, None
    tic = time.perf_counter()
    for response in responses:
        last = time.perf_counter()
        first = first or last
        tokens.append(response.token)
    peak = mx.get_peak_memory() - before + bench.weight_bytes[mode]
    steps = [1] * (len(tokens) - 1) if mode in BASELINES else list(stats.tokens_per_step)
    return Run(tokens, first - tic, last - first, steps, peak)


def summarize(runs: Dict[str, List[List[Run]]], modes: List[str]) -> Dict[str, dict]:
    """Per mode, over all prompts: medians over repeats, then sums over prompts."""
    reference = runs.get("mlx-lm")
    out = {}
    for mode in modes:
        per_prompt = runs[mode]
        gen_time = sum(statistics.median(r.gen_time for r in rs) for rs in per_prompt)
        gen_tokens = sum(len(rs[0].tokens) - 1 for rs in per_prompt)
        steps = [s for rs in per_prompt for s in rs[0].tokens_per_step]
        mismatches = None  # no mlx-lm run to compare with
        if reference is not None and mode != "mlx-lm-4bit":  # other weights: other tokens
            mismatches = [i for i, rs in enumerate(per_prompt) if rs[0].tokens != reference[i][0].tokens]
        out[mode] = {
            "tokens_per_sec": gen_tokens / gen_time if gen_time > 0 else 0.0,
            "generated_tokens": gen_tokens,
            "generation_seconds": gen_time,
            "ttft_s": statistics.mean(statistics.median(r.ttft for r in rs) for rs in per_prompt),
            "steps": len(steps),
            "mean_tokens_per_step": sum(steps) / max(1, len(steps)),
            "histogram": dict(sorted(Counter(steps).items())),
            "step_seconds": gen_time / max(1, len(steps)),
            "peak_memory_gb": max(r.peak_bytes for rs in per_prompt for r in rs) / 1e9,
            "mismatched_prompts": mismatches,
        }
    for mode, s in out.items():
        base = out.get("mlx-lm")
        s["ratio_to_mlx_lm"] = s["tokens_per_sec"] / base["tokens_per_sec"] if base else None
        ar = out.get("ar")
        s["ratio_to_ar"] = s["tokens_per_sec"] / ar["tokens_per_sec"] if ar else None
        ar_token = ar["generation_seconds"] / max(1, ar["generated_tokens"]) if ar else 0
        s["step_cost_vs_ar_token"] = s["step_seconds"] / ar_token if ar_token > 0 else None
    return out


def prompt_rows(runs: Dict[str, List[List[Run]]], prompts: List[List[int]], modes: List[str]) -> List[dict]:
    rows = []
    for i, prompt in enumerate(prompts):
        row = {"prompt_tokens": len(prompt), "modes": {}}
        for mode in modes:
            rs = runs[mode][i]
            gen = statistics.median(r.gen_time for r in rs)
            steps = rs[0].tokens_per_step
            row["modes"][mode] = {
                "generated_tokens": len(rs[0].tokens),
                "tokens_per_sec": (len(rs[0].tokens) - 1) / gen if gen > 0 else 0.0,
                "ttft_s": statistics.median(r.ttft for r in rs),
                "mean_tokens_per_step": sum(steps) / max(1, len(steps)),
                "peak_memory_gb": max(r.peak_bytes for r in rs) / 1e9,
                "runs_seconds": [r.gen_time for r in rs],
            }
        if "mlx-lm" in modes:
            base = row["modes"]["mlx-lm"]["tokens_per_sec"]
            for m in row["modes"].values():
                m["ratio_to_mlx_lm"] = m["tokens_per_sec"] / base if base > 0 else None
        rows.append(row)
    return rows


def fmt(value, spec: str, suffix: str = "") -> str:
    return "-" if value is None else format(value, spec) + suffix


def markdown_table(summary: Dict[str, dict]) -> str:
    lines = [
        "| mode | tok/s | vs mlx-lm | vs ar | TTFT ms | tokens/step | step cost (AR tokens) | peak MB | identical |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for mode, s in summary.items():
        mismatched = s["mismatched_prompts"]
        same = "-" if mismatched is None else f"NO ({len(mismatched)} prompts)" if mismatched else "yes"
        lines.append(
            f"| {mode} | {s['tokens_per_sec']:.1f} | {fmt(s['ratio_to_mlx_lm'], '.2f', 'x')} "
            f"| {fmt(s['ratio_to_ar'], '.2f', 'x')} "
            f"| {1e3 * s['ttft_s']:.1f} | {s['mean_tokens_per_step']:.2f} "
            f"| {fmt(s['step_cost_vs_ar_token'], '.2f')} | {1e3 * s['peak_memory_gb']:.1f} | {same} |"
        )
    return "\n".join(lines)


def per_prompt_table(rows: List[dict], modes: List[str]) -> str:
    lines = ["| prompt | tokens | " + " | ".join(modes) + " |", "| ---: | ---: |" + " ---: |" * len(modes)]
    for i, row in enumerate(rows):
        n = row["modes"][modes[0]]["generated_tokens"]
        cells = [f"{row['modes'][m]['tokens_per_sec']:.1f}" for m in modes]
        lines.append(f"| {i} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(summary: Dict[str, dict], path: str, title: str) -> None:
    """Three panels: tok/s per mode; tokens-per-step histogram; tok/s against verify length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(16, 4.8))
    modes = list(summary)
    ax1.bar(modes, [summary[m]["tokens_per_sec"] for m in modes], color="tab:blue")
    ax1.set_ylabel("generation tokens/s")
    ax1.set_title("tokens/s per mode")
    ax1.tick_params(axis="x", rotation=45)

    drafting = [m for m in modes if m.startswith("orthrus") or m == "auto"]
    top = max([max(summary[m]["histogram"], default=1) for m in drafting], default=1)
    for mode in drafting:
        hist = summary[mode]["histogram"]
        total = sum(hist.values()) or 1
        sizes = range(1, top + 1)
        ax2.plot(sizes, [hist.get(n, 0) / total for n in sizes], marker="o", label=mode)
    ax2.set_xlabel("tokens per step (accepted drafts + 1)")
    ax2.set_ylabel("fraction of steps")
    ax2.set_title("acceptance histogram")
    ax2.legend(fontsize=8)

    fixed = sorted((int(m.split("-")[1]), summary[m]["tokens_per_sec"]) for m in modes if m.startswith("orthrus-"))
    if fixed:
        ax3.plot(*zip(*fixed), marker="o", label="orthrus, fixed K")
    for mode, style in (("mlx-lm", "k--"), ("ar", "g:"), ("auto", "r-.")):
        if mode in summary:
            ax3.axhline(summary[mode]["tokens_per_sec"], linestyle=style[1:], color=style[0], label=mode)
    ax3.set_xscale("log", base=2)
    if fixed:
        ax3.set_xticks([k for k, _ in fixed], [str(k) for k, _ in fixed])
    ax3.set_xlabel("verify length K")
    ax3.set_ylabel("generation tokens/s")
    ax3.set_title("tokens/s against verify length")
    ax3.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    if args.max_tokens < 2 or args.num_prompts < 1 or args.repeats < 1:
        raise ValueError("--max-tokens must be >= 2, --num-prompts and --repeats >= 1")
    if args.plot and importlib.util.find_spec("matplotlib") is None:  # before minutes of runs, not after
        raise ValueError("--plot needs matplotlib: pip install 'orthrus-mlx[bench]'")
    name = str(args.model or DEFAULT_MODEL)
    model_path, drafter_path = locate(name, args.drafter)
    dtype = default_dtype(name, args.dtype)  # the mlx-lm baseline runs in the dtype we load in
    prompts_folder = drafter_path if drafter_path is not None else model_path
    prompts_path = Path(args.prompts) if args.prompts else prompts_folder / PROMPTS_FILE
    texts = load_prompts(prompts_path)[: args.num_prompts]

    model, tokenizer = load(name, dtype=dtype, drafter=args.drafter, adapter_path=args.adapter_path)
    if args.random_diffusion and model.has_diffusion:
        randomize_diffusion(model)
    block_sizes = parse_block_sizes(args.block_sizes, model.block_size)
    modes = parse_modes(args.modes, block_sizes, model.has_diffusion)
    notes = [] if model.has_diffusion else ["plain Qwen3 checkpoint: no orthrus/auto modes"]
    base_models = {}
    if "mlx-lm" in modes:
        base_models["mlx-lm"] = load_mlx_lm_model(model_path, dtype)
    if "mlx-lm-4bit" in modes:
        base_models["mlx-lm-4bit"] = load_mlx_lm_4bit(model_path)
    auto = adaptive_block(model, user_store()) if "auto" in modes else "auto"
    bench = Bench(model, base_models, tokenizer, args.max_tokens, auto)
    bench.weight_bytes = {m: weight_bytes(base_models.get(m, model)) for m in modes}
    if args.chat:
        prompts = [chat_prompt(tokenizer, [{"role": "user", "content": t}], {}) for t in texts]
    else:
        prompts = [tokenizer.encode(t) for t in texts]

    for mode in modes:  # warm-up: traces and compiles
        run_once(bench, mode, prompts[0])

    runs: Dict[str, List[List[Run]]] = {m: [[] for _ in prompts] for m in modes}
    for i, prompt in enumerate(prompts):
        for _ in range(args.repeats):
            for mode in modes:  # interleaved: A B C A B C ...
                runs[mode][i].append(run_once(bench, mode, prompt))
        print(f"prompt {i + 1}/{len(prompts)}: {len(prompt)} tokens", flush=True)

    summary = summarize(runs, modes)
    rows = prompt_rows(runs, prompts, modes)
    machine = machine_note()
    title = (
        f"{model_path.name}: {len(prompts)} prompts, {args.max_tokens} tokens, greedy, "
        f"{args.repeats} repeats ({machine})"
    )
    print(f"\n{title}\n\n{per_prompt_table(rows, modes)}\n\n{markdown_table(summary)}")
    for note in notes:
        print(f"note: {note}")
    mismatched = {m: s["mismatched_prompts"] for m, s in summary.items() if s["mismatched_prompts"]}
    for mode, idx in mismatched.items():
        print(f"MISMATCH: {mode} differs from mlx-lm's tokens on prompts {idx}")

    if args.json:
        report = {
            "machine": machine,
            "model": str(model_path),
            "settings": {
                "prompts": str(prompts_path), "num_prompts": len(prompts),
                "max_tokens": args.max_tokens, "repeats": args.repeats, "dtype": dtype, "chat": args.chat,
                "block_sizes": block_sizes, "modes": modes, "greedy": True,
                "random_diffusion": args.random_diffusion,
            },
            "summary": summary,
            "prompts": rows,
            "notes": notes,
        }
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    if args.plot:
        plot(summary, args.plot, title)
    return 1 if mismatched else 0
