"""The three generation layers over the MLX backend: token ids -> text stream -> string."""

import time
from dataclasses import dataclass, fields, replace
from typing import Any, Callable, Iterable, Iterator, List, Optional, Sequence, Union

import mlx.core as mx
from mlx_lm.generate import DEFAULT_QUANTIZED_KV_START, wired_limit
from mlx_lm.generate import GenerationResponse as MLXGenerationResponse

from . import distributed
from .backend import LogitsProcessor, MLXBackend, adaptive_block, logits_processors
from .core.policy import BlockPolicy
from .core.sampling import SamplingParams
from .core.step import DecodeStats, Step, as_token_list, eos_set, generate_steps, token_ids
from .kv_cache import (
    DEFAULT_KV_GROUP_SIZE,
    DEFAULT_PREFILL_STEP_SIZE,
    CacheOptions,
    check_rotating,
    drafts,
    make_cache,
)
from .models.qwen3 import Model

CLEAR_CACHE_EVERY = 256  # tokens, as mlx-lm's generate_step

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
    block_size: Union[int, str, BlockPolicy, None] = None,
    prompt_cache: Optional[List[Any]] = None,
    stats: Optional[DecodeStats] = None,
    kv_bits: Optional[int] = None,
    kv_group_size: int = DEFAULT_KV_GROUP_SIZE,
    quantized_kv_start: int = DEFAULT_QUANTIZED_KV_START,
    max_kv_size: Optional[int] = None,
    prefill_step_size: int = DEFAULT_PREFILL_STEP_SIZE,
    prompt_progress_callback: Optional[Callable[[int, int], None]] = None,
    history: Optional[Sequence[int]] = None,
    logits_processors: Optional[List[LogitsProcessor]] = None,
    **processing: Any,
) -> Iterator[int]:
    """Yield accepted token ids one at a time; output is exactly the base model's.

    `eos_token_id` (an int or a list) is joined with the EOS ids of the model's
    config. `block_size`: the checkpoint's K when None, a fixed length, "auto"
    (a fresh `adaptive_block(model)`: each step's length from measured step costs
    and running acceptance), or a policy object kept by the caller across
    generations. `prompt_cache` (from `model.make_cache()`) may already hold
    earlier tokens; then `prompt_tokens` are only the new ones, as in mlx-lm.

    The cache options are mlx-lm's `generate_step`'s, and the output equals its greedy output
    with the same options: `kv_bits` (4 or 8) quantizes each layer's cache once it holds
    `quantized_kv_start` entries, in groups of `kv_group_size`; `max_kv_size` bounds the cache
    (a rotating one: AR decoding only, `block_size=1`); the prompt is prefilled in chunks of
    `prefill_step_size` tokens, `prompt_progress_callback(done, total)` hearing of each.
    `processing`: the other `SamplingParams` fields (min_p, the penalties, logit_bias);
    `logits_processors` and `history`: see `mlx_generate_steps`.
    """
    refuse_sampler(processing)
    params = SamplingParams(temperature, top_p, top_k, seed, **processing)
    steps = mlx_generate_steps(
        model, prompt_tokens, eos_token_id, max_tokens, params,
        use_diffusion=use_diffusion, block_size=block_size, prompt_cache=prompt_cache,
        kv_bits=kv_bits, kv_group_size=kv_group_size, quantized_kv_start=quantized_kv_start,
        max_kv_size=max_kv_size, prefill_step_size=prefill_step_size,
        prompt_progress_callback=prompt_progress_callback,
        history=history, logits_processors=logits_processors,
    )
    yield from token_ids(steps, stats)


def mlx_generate_steps(
    model: Model,
    prompt_tokens: Union[Sequence[int], mx.array],
    eos_token_id: Union[int, Iterable[int], None] = None,
    max_tokens: int = 256,
    params: SamplingParams = SamplingParams(),
    *,
    use_diffusion: bool = True,
    block_size: Union[int, str, BlockPolicy, None] = None,
    prompt_cache: Optional[List[Any]] = None,
    logprobs: bool = False,
    prompt_progress_callback: Optional[Callable[[int, int], None]] = None,
    history: Optional[Sequence[int]] = None,
    logits_processors: Optional[List[LogitsProcessor]] = None,
    kv_bits: Optional[int] = None,
    kv_group_size: int = DEFAULT_KV_GROUP_SIZE,
    quantized_kv_start: int = DEFAULT_QUANTIZED_KV_START,
    max_kv_size: Optional[int] = None,
    prefill_step_size: int = DEFAULT_PREFILL_STEP_SIZE,
) -> Iterator[Step]:
    """`mlx_generate`'s decoding as `Step` records: which tokens were accepted drafts, and with
    `logprobs` each token's log-softmax row from the base model's own (prefill or verify) pass.
    `prompt_progress_callback(done, total)`: as mlx-lm's, at the prefill's start, chunks and end.

    `logits_processors` ((history, logits) -> logits, pure) run after those of `params`, on
    both views at every position, seeing `history` (tokens before the prompt, e.g. those a
    `prompt_cache` holds; none by default, as in mlx-lm), the prompt and the tokens so far.
    The cache options: see `mlx_generate`."""
    options = CacheOptions(kv_bits, kv_group_size, quantized_kv_start, max_kv_size, prefill_step_size)
    options.check_head_dim(model)
    cache = prompt_cache if prompt_cache is not None else make_cache(model, max_kv_size)
    check_rotating(cache, drafts(model, use_diffusion, block_size))
    group = distributed.model_group(model)
    if group is not None and not params.greedy:
        params = replace(params, seed=distributed.shared_seed(params.seed, group))
    processors = logits_processors_for(params, model.args.vocab_size) + list(logits_processors or [])
    steps = generate_steps(
        model,
        lambda prompt, policy: MLXBackend(
            model, cache, params.seed, logprobs, prompt_progress_callback, options, processors, history or ()
        ),
        lambda: adaptive_block(model),
        prompt_tokens, eos_token_id, max_tokens, params, use_diffusion, block_size,
    )
    # mlx-lm's Metal habits: the weights wired for the generation, the buffer cache freed now and then.
    with wired_limit(model):
        emitted = 0
        for step in steps:
            yield step
            emitted += len(step.tokens)
            if emitted // CLEAR_CACHE_EVERY != (emitted - len(step.tokens)) // CLEAR_CACHE_EVERY:
                mx.clear_cache()


def logits_processors_for(params: SamplingParams, vocab_size: int) -> List[LogitsProcessor]:
    return logits_processors(params, vocab_size) if params.has_processors else []


def refuse_sampler(kwargs: dict) -> None:
    """mlx-lm's `sampler=` returns a token; exact speculative sampling needs the distribution."""
    if "sampler" in kwargs:
        raise ValueError(
            "A custom sampler= cannot be used: exact speculative sampling needs each position's "
            "distribution, not a drawn token. Pass temperature, top_p, top_k, min_p (and "
            "logits_processors=) instead."
        )


SAMPLING_FIELDS = tuple(f.name for f in fields(SamplingParams))


@dataclass
class GenerationResponse(MLXGenerationResponse):
    """mlx-lm's response plus the Orthrus figures of the generation so far."""

    steps: int = 0
    mean_tokens_per_step: float = 0.0


def add_special_tokens(tokenizer, text: str) -> bool:
    """Whether encoding `text` adds the tokenizer's BOS: not when the text already starts with it."""
    bos = getattr(tokenizer, "bos_token", None)
    return bos is None or not text.startswith(bos)


def stream_generate(
    model: Model,
    tokenizer,
    prompt: Union[str, Sequence[int], mx.array],
    max_tokens: int = 256,
    **kwargs,
) -> Iterator[GenerationResponse]:
    """Stream text as tokens are accepted; `kwargs` are `mlx_generate`'s options.

    `logprobs=True` fills each response's `logprobs` as mlx-lm does: the log-softmax over the
    vocabulary at the token's position, from the base model's pass (never the drafter's). Off
    by default, it costs a vocabulary-wide pass over every verified row."""
    refuse_sampler(kwargs)
    if isinstance(prompt, str):
        prompt = tokenizer.encode(prompt, add_special_tokens=add_special_tokens(tokenizer, prompt))
    prompt = as_token_list(prompt)
    eos = eos_set(kwargs.pop("eos_token_id", None)) | set(tokenizer.eos_token_ids)
    stats = kwargs.pop("stats", None) or DecodeStats()
    if kwargs.get("block_size") == "auto" and kwargs.get("use_diffusion", True) and model.has_diffusion:
        kwargs["block_size"] = adaptive_block(model)  # measuring step costs is no prompt time

    detokenizer = tokenizer.detokenizer
    detokenizer.reset()
    tic = time.perf_counter()
    prompt_tps, n = 0.0, 0
    sampling = SamplingParams(**{k: kwargs.pop(k) for k in SAMPLING_FIELDS if k in kwargs})
    for step in mlx_generate_steps(model, prompt, eos, max_tokens, sampling, **kwargs):
        stats.record(step)
        if n == 0:
            prompt_tps = len(prompt) / (time.perf_counter() - tic)
            tic = time.perf_counter()
        for i, token in enumerate(step.tokens):
            n += 1
            finish = "stop" if token in eos else "length" if n == max_tokens else None
            if token not in eos:
                detokenizer.add_token(token)
            if finish:
                detokenizer.finalize()
            elapsed = time.perf_counter() - tic
            yield GenerationResponse(
                text=detokenizer.last_segment,
                token=token,
                logprobs=None if step.logprobs is None else step.logprobs[i],
                from_draft=i < step.accepted,
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
