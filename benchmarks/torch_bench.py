"""PyTorch backend: Orthrus vs the plain AR loop of the same backend (and Hugging Face's generate).

    python benchmarks/torch_bench.py --device cuda --preset qwen3-1.7b --compile --hf
    python benchmarks/torch_bench.py --model path/or/repo --device cuda --dtype bfloat16
    python benchmarks/torch_bench.py --device cpu --preset small --threads 2

Reports decode tokens/s of each mode (prefill excluded), Orthrus tokens per step, and the cost of
one Orthrus step (draft + verify over K positions, one host sync) relative to one AR token, timed
in a steady-state loop at a fixed cache length. Without --model the weights are random (the
diffusion view a copy of the AR view), so only the timings, not the acceptance, mean anything.
"""

import argparse
import json
import time
from typing import Dict, List, Optional

import torch

from orthrus_mlx.core.sampling import SamplingParams
from orthrus_mlx.core.step import DecodeStats, decode, token_ids
from orthrus_mlx.torch_backend.backend import TorchBackend
from orthrus_mlx.torch_backend.generate import cache_capacity
from orthrus_mlx.torch_backend.loader import DTYPES, load_model
from orthrus_mlx.torch_backend.model import Model, ModelArgs

PRESETS: Dict[str, dict] = {
    "tiny": dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16, block_size=8),
    "small": dict(vocab_size=32000, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                  num_attention_heads=8, num_key_value_heads=4, head_dim=64, block_size=16),
    "qwen3-0.6b": dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072,
                       num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                       head_dim=128, block_size=32),
    "qwen3-1.7b": dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144,
                       num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                       head_dim=128, block_size=32),
}


def random_model(preset: str, device: torch.device, dtype: torch.dtype) -> Model:
    config = dict(PRESETS[preset], rope_theta=1e6, max_position_embeddings=4096,
                  tie_word_embeddings=True)
    config["mask_token_id"] = config["vocab_size"] - 1
    with torch.device(device):
        model = Model(ModelArgs.from_dict(config))
    model.init_weights(std=0.05)
    return model.to(dtype).eval().requires_grad_(False)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed_decode(model: Model, prompt: List[int], max_tokens: int, block_size: int,
                 compile: bool, device: torch.device) -> dict:
    """Greedy decode with no EOS, timed from the first token (prefill excluded)."""
    cache = model.make_cache(cache_capacity(model, len(prompt) + max_tokens))
    backend = TorchBackend(model, cache, compile=compile, block_size=block_size)
    stats = DecodeStats()
    tokens, start = [], None
    steps = decode(backend, prompt, max_tokens=max_tokens, eos_token_id=None,
                   params=SamplingParams(), block_size=block_size)
    for token in token_ids(steps, stats):
        if start is None:
            sync(device)
            start = time.perf_counter()
        tokens.append(token)
    sync(device)
    seconds = time.perf_counter() - start
    return dict(tokens=tokens, tokens_per_s=(len(tokens) - 1) / seconds,
                tokens_per_step=stats.mean_tokens_per_step, steps=stats.steps)


def step_seconds(model: Model, prompt: List[int], length: int, iters: int, compile: bool,
                 device: torch.device, capacity: int) -> float:
    """Seconds of one decoding step of `length` positions at a fixed cache length."""
    backend = TorchBackend(model, model.make_cache(capacity), compile=compile, block_size=length)
    params = SamplingParams()
    token = backend.prefill(prompt, params)

    def one_step():
        drafted = backend.draft(token, length, params) if length > 1 else None
        backend.verify(token, drafted, params)  # the step's host sync
        backend.trim(length)

    for _ in range(3):  # warm-up (and compilation)
        one_step()
    sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        one_step()
    sync(device)
    return (time.perf_counter() - start) / iters


def hf_model(model: Model, device: torch.device, dtype: torch.dtype):
    """transformers' Qwen3ForCausalLM on the same AR weights, or None without transformers."""
    try:
        from transformers import Qwen3Config, Qwen3ForCausalLM
    except ImportError:
        return None
    a = model.args
    config = Qwen3Config(
        vocab_size=a.vocab_size, hidden_size=a.hidden_size, intermediate_size=a.intermediate_size,
        num_hidden_layers=a.num_hidden_layers, num_attention_heads=a.num_attention_heads,
        num_key_value_heads=a.num_key_value_heads, head_dim=a.head_dim,
        rms_norm_eps=a.rms_norm_eps, rope_theta=a.rope_theta,
        max_position_embeddings=a.max_position_embeddings,
        tie_word_embeddings=a.tie_word_embeddings, attn_implementation="sdpa",
    )
    with torch.device(device):
        hf = Qwen3ForCausalLM(config).to(dtype)
    state = {k: v for k, v in model.state_dict().items() if "_diff" not in k}
    hf.load_state_dict(state, strict=False)
    if a.tie_word_embeddings:
        hf.tie_weights()
    return hf.eval()


def hf_decode(hf, prompt: List[int], max_tokens: int, device: torch.device) -> dict:
    ids = torch.tensor([prompt], device=device)
    kwargs = dict(do_sample=False, eos_token_id=None, pad_token_id=0)

    def run(n: int):
        sync(device)
        start = time.perf_counter()
        out = hf.generate(ids, max_new_tokens=n, min_new_tokens=n, **kwargs)
        sync(device)
        return out, time.perf_counter() - start

    run(2)  # warm-up
    _, first = run(1)  # prefill and the first token
    out, total = run(max_tokens)
    tokens = out[0, len(prompt):].tolist()
    return dict(tokens=tokens, tokens_per_s=(len(tokens) - 1) / max(total - first, 1e-9))


def match_rate(a: List[int], b: List[int]) -> float:
    """Length of the common prefix over the length: 1.0 is token-for-token identical."""
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n / max(len(a), 1)


def main(argv: Optional[List[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="checkpoint folder or Hugging Face repo id (default: random weights)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small", help="random model size")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--block-size", type=int, help="default: the checkpoint's K")
    parser.add_argument("--step-iters", type=int, default=20, help="iterations of the step-cost loop")
    parser.add_argument("--compile", action="store_true", help="torch.compile the step passes (CUDA graphs on GPU)")
    parser.add_argument("--hf", action="store_true", help="also time transformers' Qwen3 generate")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write the figures to this file")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if args.model:
        model, _ = load_model(args.model, device=device, dtype=args.dtype)
        source = args.model
    else:
        model = random_model(args.preset, device, dtype)
        source = f"random {args.preset}"
    if not model.has_diffusion:
        raise SystemExit("The checkpoint has no diffusion view: nothing to compare.")
    K = args.block_size or model.block_size
    gen = torch.Generator().manual_seed(args.seed)
    prompt = torch.randint(0, model.args.vocab_size - 1, (args.prompt_tokens,), generator=gen).tolist()
    capacity = cache_capacity(model, args.prompt_tokens + args.max_tokens)

    results = dict(model=source, device=str(device), dtype=str(dtype).replace("torch.", ""),
                   block_size=K, compile=args.compile, prompt_tokens=args.prompt_tokens,
                   max_tokens=args.max_tokens)
    if device.type == "cuda":
        results["gpu"] = torch.cuda.get_device_name(device)
    with torch.inference_mode():
        # Each mode runs twice, timed the second time: compilation and allocation are done then.
        ar = [timed_decode(model, prompt, args.max_tokens, 1, args.compile, device) for _ in range(2)][-1]
        orthrus = [timed_decode(model, prompt, args.max_tokens, K, args.compile, device) for _ in range(2)][-1]
        ar_step = step_seconds(model, prompt, 1, args.step_iters, args.compile, device, capacity)
        k_step = step_seconds(model, prompt, K, args.step_iters, args.compile, device, capacity)
        hf = hf_model(model, device, dtype) if args.hf else None
        hf_run = hf_decode(hf, prompt, args.max_tokens, device) if hf is not None else None

    results.update(
        ar_tokens_per_s=ar["tokens_per_s"],
        orthrus_tokens_per_s=orthrus["tokens_per_s"],
        orthrus_tokens_per_step=orthrus["tokens_per_step"],
        speedup_vs_ar=orthrus["tokens_per_s"] / ar["tokens_per_s"],
        ar_token_ms=ar_step * 1e3,
        orthrus_step_ms=k_step * 1e3,
        step_cost_in_ar_tokens=k_step / ar_step,
        orthrus_matches_ar=match_rate(orthrus["tokens"], ar["tokens"]),
    )
    if args.hf:
        if hf_run is None:
            results["hf"] = "transformers is not installed"
        else:
            results.update(hf_tokens_per_s=hf_run["tokens_per_s"],
                           hf_matches_ar=match_rate(hf_run["tokens"], ar["tokens"]))

    print(f"{source} on {results.get('gpu', device)} ({results['dtype']}), K={K}, "
          f"compile={args.compile}, prompt {args.prompt_tokens}, {args.max_tokens} new tokens")
    print(f"  AR loop        {results['ar_tokens_per_s']:9.1f} tokens/s   ({results['ar_token_ms']:.2f} ms/token)")
    print(f"  Orthrus        {results['orthrus_tokens_per_s']:9.1f} tokens/s   "
          f"({results['orthrus_tokens_per_step']:.2f} tokens/step, x{results['speedup_vs_ar']:.2f} vs AR)")
    print(f"  one step of K  {results['orthrus_step_ms']:9.2f} ms = {results['step_cost_in_ar_tokens']:.2f} AR tokens "
          f"(Orthrus wins once tokens/step exceeds this)")
    if "hf_tokens_per_s" in results:
        print(f"  HF generate    {results['hf_tokens_per_s']:9.1f} tokens/s   "
              f"(match with AR: {results['hf_matches_ar']:.2f})")
    print(f"  Orthrus == AR greedy: {results['orthrus_matches_ar']:.2f} of the tokens (common prefix)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
