"""The three generation layers over the MLX backend: token ids -> text stream -> string."""

import time
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, List, Optional, Sequence, Union

import mlx.core as mx
from mlx_lm.generate import GenerationResponse as MLXGenerationResponse

from .backend import MLXBackend, adaptive_block
from .core.costs import remembering
from .core.policy import block_policy
from .core.sampling import SamplingParams
from .core.step import DecodeStats, as_token_list, decode, eos_set
from .models.qwen3 import Model


def mlx_generate(
    model: Model,
    prompt_tokens: Union[Sequence[int], mx.array],
    eos_token_id: Union[int, Iterable[int], None] = None,
    max_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: Optional[int] = None,
    use_diffusion: bool = True,
    *,
    block_size: Union[int, str, None] = None,
    prompt_cache: Optional[List[Any]] = None,
    stats: Optional[DecodeStats] = None,
) -> Iterator[int]:
    """Yield accepted token ids one at a time; output is exactly the base model's.

    `eos_token_id` (an int or a list) is joined with the EOS ids of the model's
    config. `block_size`: the checkpoint's K when None, a fixed length, or
    "auto" to choose each step's length from measured step costs and running
    acceptance. `prompt_cache` (from `model.make_cache()`) may already hold
    earlier tokens; then `prompt_tokens` are only the new ones, as in mlx-lm.
    """
    params = SamplingParams(temperature, top_p, top_k, seed)
    block_size = block_policy(
        block_size, use_diffusion and model.has_diffusion, model.block_size, lambda: adaptive_block(model)
    )
    cache = prompt_cache if prompt_cache is not None else model.make_cache()
    backend = MLXBackend(model, cache, seed)
    eos = eos_set(eos_token_id) | eos_set(model.args.eos_token_id)
    tokens = decode(
        backend,
        as_token_list(prompt_tokens),
        max_tokens=max_tokens,
        eos_token_id=eos,
        params=params,
        block_size=block_size,
        stats=stats,
    )
    yield from remembering(tokens, block_size)


@dataclass
class GenerationResponse(MLXGenerationResponse):
    """mlx-lm's response plus the Orthrus figures of the generation so far."""

    steps: int = 0
    mean_tokens_per_step: float = 0.0


def stream_generate(
    model: Model,
    tokenizer,
    prompt: Union[str, Sequence[int], mx.array],
    max_tokens: int = 256,
    **kwargs,
) -> Iterator[GenerationResponse]:
    """Stream text as tokens are accepted; `kwargs` are `mlx_generate`'s options."""
    if isinstance(prompt, str):
        bos = getattr(tokenizer, "bos_token", None)
        add_special = bos is None or not prompt.startswith(bos)
        prompt = tokenizer.encode(prompt, add_special_tokens=add_special)
    prompt = as_token_list(prompt)
    eos = eos_set(kwargs.pop("eos_token_id", None)) | set(tokenizer.eos_token_ids)
    stats = kwargs.pop("stats", None) or DecodeStats()
    if kwargs.get("block_size") == "auto" and kwargs.get("use_diffusion", True) and model.has_diffusion:
        adaptive_block(model)  # a first use measures step costs: keep that out of the prompt time

    detokenizer = tokenizer.detokenizer
    detokenizer.reset()
    tic = time.perf_counter()
    prompt_tps = 0.0
    steps_seen, index_in_step = 0, 0
    tokens = mlx_generate(model, prompt, eos, max_tokens, stats=stats, **kwargs)
    for n, token in enumerate(tokens, start=1):
        if n == 1:
            prompt_time = time.perf_counter() - tic
            prompt_tps = len(prompt) / prompt_time
            tic = time.perf_counter()
        if stats.steps != steps_seen:
            steps_seen, index_in_step = stats.steps, 0
        from_draft = steps_seen > 0 and index_in_step < stats.tokens_per_step[-1] - 1
        index_in_step += 1

        finish = None
        if token in eos:
            finish = "stop"
        elif n == max_tokens:
            finish = "length"
        if token not in eos:
            detokenizer.add_token(token)
        if finish:
            detokenizer.finalize()
        elapsed = time.perf_counter() - tic
        yield GenerationResponse(
            text=detokenizer.last_segment,
            token=token,
            logprobs=None,
            from_draft=from_draft,
            prompt_tokens=len(prompt),
            prompt_tps=prompt_tps,
            generation_tokens=n,
            generation_tps=(n - 1) / elapsed if n > 1 and elapsed > 0 else 0.0,
            peak_memory=mx.get_peak_memory() / 1e9,
            finish_reason=finish,
            steps=stats.steps,
            mean_tokens_per_step=stats.mean_tokens_per_step,
        )


def generate(
    model: Model,
    tokenizer,
    prompt: Union[str, Sequence[int], mx.array],
    verbose: bool = False,
    **kwargs,
) -> str:
    """The whole generated text; `verbose` prints it as it streams, then the figures."""
    text, last = "", None
    for response in stream_generate(model, tokenizer, prompt, **kwargs):
        text += response.text
        last = response
        if verbose:
            print(response.text, end="", flush=True)
    if verbose and last is not None:
        print()
        print("=" * 10)
        print(f"Prompt: {last.prompt_tokens} tokens, {last.prompt_tps:.3f} tokens-per-sec")
        print(
            f"Generation: {last.generation_tokens} tokens, "
            f"{last.generation_tps:.3f} tokens-per-sec"
        )
        print(
            f"Orthrus: {last.steps} steps, "
            f"{last.mean_tokens_per_step:.2f} tokens-per-step"
        )
        print(f"Peak memory: {last.peak_memory:.3f} GB")
    return text
