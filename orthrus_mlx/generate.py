"""MLX backend and the three generation layers: token ids -> text stream -> string."""

import time
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, List, Optional, Sequence, Union

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.generate import GenerationResponse as MLXGenerationResponse
from mlx_lm.sample_utils import apply_top_k, apply_top_p

from .costs import adaptive_policy, machine_key, remembering
from .decode import (
    AdaptiveBlock,
    DecodeStats,
    SamplingParams,
    Scores,
    as_token_list,
    block_policy,
    decode,
    eos_set,
    per_model,
)
from .model import Model
from .passes import compiled_passes

PREFILL_STEP_SIZE = 2048
# Part of the step-cost cache key: change it when a change to the passes or the
# weight layout changes what a step costs, so that old calibrations are not reused.
STEP_IMPLEMENTATION = "compiled passes; float32 weights stored transposed on the CPU"


def log_probs(logits: mx.array, params: SamplingParams) -> mx.array:
    """Temperature, then top-k, then top-p; the same processing for both views."""
    logits = logits.astype(mx.float32) / params.temperature
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    if 0 < params.top_k < logprobs.shape[-1]:
        logprobs = apply_top_k(logprobs, params.top_k)
    if params.top_p < 1.0:
        logprobs = apply_top_p(logprobs, params.top_p)
    return logprobs - mx.logsumexp(logprobs, axis=-1, keepdims=True)


class MLXBackend:
    """The model passes of one generation over an explicit per-layer KV cache."""

    def __init__(self, model: Model, cache: List[Any], seed: Optional[int] = None):
        self.model = model
        self.cache = cache
        self.passes = compiled_passes(model)
        self.vocab_size = model.args.vocab_size
        self.max_positions = model.args.max_position_embeddings
        self.key = mx.random.key(seed) if seed is not None else None

    def next_key(self) -> Optional[mx.array]:
        if self.key is None:
            return None
        self.key, key = mx.random.split(self.key)
        return key

    def sample(self, logits: mx.array, params: SamplingParams) -> mx.array:
        if params.greedy:
            return mx.argmax(logits, axis=-1).astype(mx.int32)
        lp = log_probs(logits, params)
        return mx.random.categorical(lp, key=self.next_key()).astype(mx.int32)

    def prefill(self, tokens: Sequence[int], params: SamplingParams) -> int:
        tokens = mx.array(tokens, dtype=mx.int32)
        while tokens.size > PREFILL_STEP_SIZE:
            self.model(tokens[None, :PREFILL_STEP_SIZE], cache=self.cache)
            mx.eval([c.state for c in self.cache])
            tokens = tokens[PREFILL_STEP_SIZE:]
        logits = self.model(tokens[None], cache=self.cache)[0, -1]
        return self.sample(logits, params).item()

    def draft(self, token: int, length: int, params: SamplingParams):
        block = mx.array([[token] + [self.model.mask_token_id] * (length - 1)])
        logits = self.passes(block, self.cache, "draft")[0, :-1]
        q = None if params.greedy else log_probs(logits, params)
        d = self.sample(logits, params) if q is None else mx.random.categorical(q, key=self.next_key()).astype(mx.int32)
        # The draft computes while the verify pass's graph is being built.
        mx.async_eval(d, q) if q is not None else mx.async_eval(d)
        return d, q

    def verify(self, token: int, drafted, params: SamplingParams) -> Scores:
        d, q = drafted if drafted is not None else (mx.zeros((0,), mx.int32), None)
        block = mx.concatenate([mx.array([token], dtype=mx.int32), d])
        logits = self.passes(block[None], self.cache, "verify")[0]
        if params.greedy:
            target = self.sample(logits, params)
            mx.eval(d, target)
            return Scores(d.tolist(), target.tolist())

        p = log_probs(logits, params)
        if q is None:
            target = mx.random.categorical(p, key=self.next_key())
            return Scores([], target.tolist())
        p_d = mx.take_along_axis(p[:-1], d[:, None], axis=-1)[:, 0]
        q_d = mx.take_along_axis(q, d[:, None], axis=-1)[:, 0]
        ratio = mx.exp(p_d - q_d)
        # A bonus candidate for every possible rejection point, drawn at once;
        # the host keeps the one at the first rejection.
        residual = mx.maximum(mx.exp(p[:-1]) - mx.exp(q), 0.0)
        has_mass = residual.sum(axis=-1, keepdims=True) > 0
        residual = mx.where(has_mass, mx.log(residual), p[:-1])
        target = mx.random.categorical(
            mx.concatenate([residual, p[-1:]]), key=self.next_key()
        )
        mx.eval(d, target, ratio)
        return Scores(d.tolist(), target.tolist(), ratio.tolist())

    def trim(self, n: int) -> None:
        for c in self.cache:
            c.trim(n)

    def cache_length(self) -> int:
        return self.cache[0].offset


def model_key(model: Model) -> str:
    """MLX version, device, architecture, dtype and quantization of a model, on this machine."""
    quant = [
        (name, m.bits, m.group_size)
        for name, m in model.named_modules()
        if isinstance(m, nn.QuantizedLinear) and name.startswith("model.layers.0.")
    ]
    layer = model.layers[0].self_attn
    return machine_key(
        "mlx", mx.__version__, str(mx.default_device()), STEP_IMPLEMENTATION, repr(model.args),
        str(layer.q_proj.weight.dtype), repr(sorted(quant)),
    )


def adaptive_block(model: Model) -> AdaptiveBlock:
    """The adaptive policy over this machine's measured step costs for `model`.

    One per model object: its acceptance statistics carry over from one
    generation to the next, so a new prompt does not relearn them, and are
    kept with the step costs, so a new process does not either.
    """

    make_backend = lambda: MLXBackend(model, model.make_cache())
    make = lambda: adaptive_policy(model_key(model), weights_fingerprint(model), make_backend, model.block_size)
    return per_model(model, "_adaptive_block", make)


def weights_fingerprint(model: Model) -> str:
    """A few weights of both views, so that two checkpoints of one shape learn apart."""
    first, last = model.layers[0].self_attn, model.layers[-1].self_attn
    sample = [first.q_proj.weight, first.q_proj_diff.weight, last.o_proj_diff.weight]
    return repr([w[0, :8].astype(mx.float32).tolist() for w in sample])


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
