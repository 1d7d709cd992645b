"""The MLX backend: the model passes of one generation over an explicit per-layer KV cache."""

import sys
from typing import Any, Callable, List, Optional, Sequence

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p, make_logits_processors

from . import distributed, passes
from .core.costs import CostStore, adaptive_policy, machine_key, source_hash
from .core.policy import AdaptiveBlock
from .core.sampling import SamplingParams
from .core.step import Scores
from .kv_cache import CacheOptions, block_room, maybe_quantize
from .models.qwen3 import Model

LogitsProcessor = Callable[[mx.array, mx.array], mx.array]  # (history, logits [1, vocab]) -> logits

def log_probs(logits: mx.array, params: SamplingParams) -> mx.array:
    """min-p, temperature, top-k, top-p; the same processing for both views.

    min-p is mlx-lm's `apply_min_p` on the untempered distribution, where `make_sampler`
    applies it; we need the distribution itself, not a sampled token, so not the sampler."""
    logits = logits.astype(mx.float32)
    if params.min_p > 0:
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        logits = apply_min_p(logprobs, params.min_p, params.min_tokens_to_keep)
    logits = logits / params.temperature
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    if 0 < params.top_k < logprobs.shape[-1]:
        logprobs = apply_top_k(logprobs, params.top_k)
    if params.top_p < 1.0:
        logprobs = apply_top_p(logprobs, params.top_p)
    return logprobs - mx.logsumexp(logprobs, axis=-1, keepdims=True)


def scores_from(d: mx.array, target: mx.array, ratio: Optional[mx.array], rows: Optional[mx.array]) -> Scores:
    """`Scores` from the evaluated arrays of `MLXBackend.score`."""
    return Scores(d.tolist(), target.tolist(), None if ratio is None else ratio.tolist(), rows)


def logits_processors(params: SamplingParams, vocab_size: int) -> List[LogitsProcessor]:
    """mlx-lm's processors for `params` (none when all are off)."""
    bad = [t for t in params.logit_bias or () if t >= vocab_size]
    if bad:
        raise ValueError(f"logit_bias token ids outside the vocabulary [0, {vocab_size}): {bad[:8]}")
    return make_logits_processors(
        params.logit_bias,
        params.repetition_penalty, params.repetition_context_size,
        params.presence_penalty, params.presence_context_size,
        params.frequency_penalty, params.frequency_context_size,
    )


def log_softmax(logits: mx.array) -> mx.array:
    """The base model's log-probabilities, as mlx-lm reports them (no sampling processing)."""
    logits = logits.astype(mx.float32)
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


class MLXBackend:
    """The model passes of one generation over an explicit per-layer KV cache.

    With `logprobs`, the prefill and every verify pass also hand back their log-softmax
    rows (`prefill_logprobs`, `Scores.logprobs`): vocabulary-wide work no other caller pays.

    With `processors` ((history, logits) -> logits, as mlx-lm's), both views' logits at every
    block position are processed with the history AR decoding would have there: `history`
    (tokens before the prompt), the prompt, the committed tokens and the block's earlier
    drafts. The backend keeps that history in step with the cache. Processors must be pure:
    they also see drafts that are then rejected.
    """

    def __init__(
        self,
        model: Model,
        cache: List[Any],
        seed: Optional[int] = None,
        logprobs: bool = False,
        progress: Optional[Callable[[int, int], None]] = None,
        options: CacheOptions = CacheOptions(),
        processors: Sequence[LogitsProcessor] = (),
        history: Sequence[int] = (),
    ):
        self.model = model
        self.cache = cache  # a list the quantization replaces entries of, in place (as mlx-lm's)
        self.options = options
        self.processors = list(processors)
        self.history = mx.array(list(history), dtype=mx.int32) if self.processors else None
        self.logprobs = logprobs
        self.progress = progress or (lambda done, total: None)  # (prompt tokens prefilled, total), as mlx-lm
        self.prefill_logprobs: Optional[mx.array] = None
        self.passes = passes.compiled_passes(model)
        self.vocab_size = model.args.vocab_size
        self.max_positions = model.args.max_position_embeddings
        self.key = mx.random.key(seed) if seed is not None else None

    def next_key(self) -> Optional[mx.array]:
        if self.key is None:
            return None
        self.key, key = mx.random.split(self.key)
        return key

    def process(self, history: mx.array, logits: mx.array) -> mx.array:
        """One position's logits [1, vocab] after every processor, given the tokens before it."""
        for processor in self.processors:
            logits = processor(history, logits)
        return logits

    def process_rows(self, logits: mx.array, block: mx.array) -> mx.array:
        """Rows [L, vocab] of a pass over `block` after the cache: row i sees block[: i + 1]."""
        history = mx.concatenate([self.history, block])
        start = self.history.size
        return mx.concatenate([self.process(history[: start + i + 1], logits[i : i + 1]) for i in range(block.size)])

    def sample(self, logits: mx.array, params: SamplingParams) -> mx.array:
        if params.greedy:
            return mx.argmax(logits, axis=-1).astype(mx.int32)
        lp = log_probs(logits, params)
        return mx.random.categorical(lp, key=self.next_key()).astype(mx.int32)

    def prefill(self, tokens: Sequence[int], params: SamplingParams) -> int:
        # mlx-lm's generate_step order: all but the last token in chunks, the cache quantized
        # after each, then the last token alone; a quantized cache then equals mlx-lm's.
        tokens = mx.array(tokens, dtype=mx.int32)
        total, step = tokens.size, self.options.prefill_step_size
        if self.processors:
            self.history = mx.concatenate([self.history, tokens])
        self.progress(0, total)
        while tokens.size > 1:
            chunk = min(step, tokens.size - 1)
            self.model(tokens[None, :chunk], cache=self.cache)
            maybe_quantize(self.cache, self.options)
            mx.eval([c.state for c in self.cache])
            tokens = tokens[chunk:]
            self.progress(total - tokens.size, total)
            mx.clear_cache()
        logits = self.model(tokens[None], cache=self.cache)[0, -1]
        maybe_quantize(self.cache, self.options)
        token = self.first_token(logits, params)
        self.progress(total, total)
        return token

    def first_token(self, logits: mx.array, params: SamplingParams) -> int:
        """The token after the prompt from its last logits [vocab], the history holding the prompt."""
        if self.processors:
            logits = self.process(self.history, logits[None])[0]
        if self.logprobs:
            self.prefill_logprobs = log_softmax(logits)
        return self.sample(logits, params).item()

    def draft(self, token: int, length: int, params: SamplingParams):
        block = mx.array([[token] + [self.model.mask_token_id] * (length - 1)])
        logits = self.passes(block, self.cache, "draft")[0, :-1]
        drafted = self.drafts_from(token, logits, params)
        # The draft computes while the verify pass's graph is being built.
        mx.async_eval(*(a for a in drafted if a is not None))
        return drafted

    def drafts_from(self, token: int, logits: mx.array, params: SamplingParams):
        """(d, q) from the draft pass's logits [L - 1, vocab] over a block opening with `token`."""
        if self.processors:
            return self.draft_processed(token, logits, params)
        return self.sample_draft(logits, params)

    def sample_draft(self, logits: mx.array, params: SamplingParams):
        """(d, q) from the draft pass's logits: the drafted tokens and, sampling, their log-probabilities."""
        q = None if params.greedy else log_probs(logits, params)
        d = self.sample(logits, params) if q is None else mx.random.categorical(q, key=self.next_key()).astype(mx.int32)
        return d, q

    def draft_processed(self, token: int, logits: mx.array, params: SamplingParams):
        """Drafts one position at a time: position i's processors see the drafts before it."""
        history = mx.concatenate([self.history, mx.array([token], dtype=mx.int32)])
        drafts, qs = [], []
        for i in range(logits.shape[0]):
            row = self.process(history, logits[i : i + 1])
            if params.greedy:
                d = mx.argmax(row, axis=-1).astype(mx.int32)
            else:
                qs.append(log_probs(row, params))
                d = mx.random.categorical(qs[-1], key=self.next_key()).astype(mx.int32)
            drafts.append(d)
            history = mx.concatenate([history, d])
        return mx.concatenate(drafts), mx.concatenate(qs) if qs else None

    def verify(self, token: int, drafted, params: SamplingParams) -> Scores:
        d = drafted[0] if drafted is not None else mx.zeros((0,), mx.int32)
        block = mx.concatenate([mx.array([token], dtype=mx.int32), d])
        logits = self.passes(block[None], self.cache, "verify")[0]
        arrays = self.score(self.verified(logits, block), drafted, params)
        mx.eval(*(a for a in arrays if a is not None))
        return scores_from(*arrays)

    def verified(self, logits: mx.array, block: mx.array) -> mx.array:
        """The verify pass's logits [L, vocab] over `block` after the processors; the history
        then holds the block (`trim` drops the rejected part)."""
        if not self.processors:
            return logits
        logits = self.process_rows(logits, block)
        self.history = mx.concatenate([self.history, block])
        return logits

    def score(self, logits: mx.array, drafted, params: SamplingParams):
        """The verify pass's lazy (draft, target, ratio, logprob rows) for `Scores`, see there."""
        d, q = drafted if drafted is not None else (mx.zeros((0,), mx.int32), None)
        rows = log_softmax(logits) if self.logprobs else None
        if params.greedy:
            return d, self.sample(logits, params), None, rows

        p = log_probs(logits, params)
        if q is None:
            return d, mx.random.categorical(p, key=self.next_key()), None, rows
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
        return d, target, ratio, rows

    def trim(self, n: int) -> None:
        for c in self.cache:
            c.trim(n)
        self.trim_history(n)
        maybe_quantize(self.cache, self.options)  # the end of a step, where mlx-lm quantizes

    def trim_history(self, n: int) -> None:
        if self.history is not None and n > 0:
            self.history = self.history[: self.history.size - n]

    def block_room(self) -> Optional[int]:
        return block_room(self.cache, self.options)

    def cache_length(self) -> int:
        return self.cache[0].offset


def cost_key(model: Model) -> str:
    """What a step's cost depends on: this machine, MLX and its device, the code that runs a
    step (passes, backend, the model's classes, weight layout), the shapes, dtype and quantization."""
    quant = [
        (name, m.bits, m.group_size)
        for name, m in model.named_modules()
        if isinstance(m, nn.QuantizedLinear) and name.startswith("model.layers.0.")
    ]
    layer = model.layers[0].self_attn
    lora = sorted(name for name, m in model.named_modules() if hasattr(m, "lora_a"))  # adapters.py
    model_code = sorted({c.__module__ for c in type(model).__mro__ if c.__module__.startswith(__package__)})
    code = source_hash(passes, MLXBackend, *(sys.modules[m] for m in model_code))
    group = distributed.model_group(model)
    return machine_key(
        "mlx", mx.__version__, str(mx.default_device()), code, repr(model.args),
        str(getattr(layer.q_proj, "linear", layer.q_proj).weight.dtype), repr(sorted(quant)),
        *([f"ranks={group.size()}"] if group else []), *([repr(lora)] if lora else []),
    )


def adaptive_block(model: Model, store: Optional[CostStore] = None) -> AdaptiveBlock:
    """A fresh adaptive block policy for `model`, over this machine's step costs (measured on
    first use and kept in `store`: the process's memory when None, as for `block_size="auto"`).

    Pass it as `block_size` to every generation that should share what it learns
    (acceptance, cost corrections): the commands keep one per process.
    """
    make_backend = lambda: MLXBackend(model, model.make_cache())
    group = distributed.model_group(model)
    if group is not None:  # every rank must take rank 0's decisions
        return distributed.shared_adaptive_policy(cost_key(model), make_backend, model.block_size, store, group)
    return adaptive_policy(cost_key(model), make_backend, model.block_size, store)
