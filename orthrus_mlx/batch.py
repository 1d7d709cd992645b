"""Batched Orthrus decoding with continuous batching: one draft and one verify pass per step
over every active sequence, each sequence exactly as it decodes alone.

The batch's KV cache is right-padded with a length per row. A step writes every row's block
at that row's own length and advances each length by what the row accepted, so ragged
acceptance needs no copy: a row's rejected slots sit past its length, masked, and the next
step overwrites them. Masks and rotary positions are per row; newcomers are prefilled in
chunks, one chunk per step, in a cache of their own, then copied into the batch. A newcomer's
cache may already hold a prefix of its prompt (a prompt cache, as mlx-lm's `BatchGenerator`
takes one); only the rest is prefilled, and when the row leaves, that same cache list is
refilled with everything the row holds, for the caller to keep for the next turn.

Everything after the two passes is per row, by the row's own `MLXBackend`: its sampling
parameters, random key (split only by its own draws), acceptance draws, logits processors
with its own history, and logprob rows. So a row draws what it draws alone, whatever else
is in the batch.
"""

import random
import time
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, NamedTuple, Optional, Sequence, Union

import mlx.core as mx
from mlx_lm.models.cache import KVCache

from .backend import MLXBackend, adaptive_block, scores_from
from .core.policy import BlockPolicy, block_policy
from .core.sampling import SamplingParams
from .core.step import accept, as_token_list, check_request, eos_set
from .generate import add_special_tokens, logits_processors_for, refuse_sampler
from .models.qwen3 import Model
from .passes import compiled_passes

PREFILL_CHUNK = 512
CACHE_STEP = 256


class BatchLayerCache:
    """One layer's keys and values, [B, kv_heads, capacity, head_dim], rows right-padded."""

    def __init__(self):
        self.keys: Optional[mx.array] = None
        self.values: Optional[mx.array] = None

    def write(self, keys: mx.array, values: mx.array, lengths: mx.array, extent: int):
        """Write each row's block at that row's length; the cache's first `extent` slots."""
        B, H, L, D = keys.shape
        if self.keys.shape[2] < extent:
            grow = ((extent - self.keys.shape[2] + CACHE_STEP - 1) // CACHE_STEP) * CACHE_STEP
            pad = lambda a: mx.concatenate([a, mx.zeros((B, H, grow, a.shape[3]), a.dtype)], axis=2)
            self.keys, self.values = pad(self.keys), pad(self.values)
        rows = mx.arange(B)[:, None]
        slots = lengths[:, None] + mx.arange(L)
        self.keys[rows, :, slots] = keys.transpose(0, 2, 1, 3)
        self.values[rows, :, slots] = values.transpose(0, 2, 1, 3)
        return self.keys[:, :, :extent], self.values[:, :, :extent]

    def append_row(self, keys: mx.array, values: mx.array) -> None:
        """Add a row from a single sequence's cache ([1, H, n, D])."""
        if self.keys is None:
            self.keys, self.values = keys, values
            return
        width = max(self.keys.shape[2], keys.shape[2])
        fit = lambda a: mx.pad(a, [(0, 0), (0, 0), (0, width - a.shape[2]), (0, 0)])
        self.keys = mx.concatenate([fit(self.keys), fit(keys)])
        self.values = mx.concatenate([fit(self.values), fit(values)])

    def row(self, index: int, length: int) -> KVCache:
        """Row `index`'s first `length` positions as a cache of its own (a copy, not a view that
        would keep the whole batch's arrays alive)."""
        cache = KVCache()
        cache.keys, cache.values = (mx.contiguous(a[index : index + 1, :, :length]) for a in (self.keys, self.values))
        cache.offset = length
        return cache

    def keep_rows(self, rows: List[int]) -> None:
        if not rows:
            self.keys = self.values = None
        else:
            index = mx.array(rows)
            self.keys, self.values = self.keys[index], self.values[index]


def batch_pass(model: Model, tokens: mx.array, cache: List[BatchLayerCache], lengths: List[int],
               view: str, visible: mx.array) -> mx.array:
    """Logits [B, L, vocab] of one pass of `view` over every row's block at its own length.

    Query l of row b sees the cached slots before lengths[b] + visible[b, l]: l + 1 for the
    verify pass (causal), the row's block length for the draft pass (the whole block)."""
    passes = compiled_passes(model)
    B, L = tokens.shape
    offsets = mx.array(lengths, dtype=mx.int32)
    extent = max(lengths) + L
    mask = mx.arange(extent) < (offsets[:, None] + visible)[:, None, :, None]
    h, angles, queries, keys, values = passes.enter[view](tokens, offsets)
    layers = passes.layers
    for i, (layer, c) in enumerate(zip(layers, cache)):
        keys, values = c.write(keys, values, offsets, extent)
        attended = mx.fast.scaled_dot_product_attention(
            queries, keys, values, scale=layer.self_attn.scale, mask=mask
        )
        if i + 1 < len(layers):
            h, queries, keys, values = passes.between[view][i](h, attended, angles)
    return passes.leave[view](h, attended)


class Emitted(NamedTuple):
    """What one step gave a sequence: its new tokens, whether it is finished, and for a
    sequence inserted with `logprobs`, each token's log-softmax row (as `Step.logprobs`)."""

    uid: int
    tokens: List[int]
    finished: bool
    logprobs: Optional[List[mx.array]] = None


@dataclass
class Row:
    """One sequence of the batch: its own sampling, block policy, EOS ids and randomness."""

    uid: int
    prompt: List[int]
    max_tokens: int
    params: SamplingParams
    policy: BlockPolicy
    eos: frozenset
    backend: MLXBackend  # its own cache while prefilling; key, processors, logprobs throughout
    rng: random.Random
    prompt_cache: Optional[List[Any]] = None  # the caller's, refilled when the row leaves
    prefilled: int = 0
    token: int = -1  # the last emitted token, not yet in the cache
    emitted: int = 0
    length: int = 0  # cached positions
    steps: List[int] = field(default_factory=list)  # tokens emitted per decoding step


class BatchDecoder:
    """Continuous batching of Orthrus decoding: `insert` sequences at any time, call `step`
    until it reports them finished; each sequence's tokens are exactly those it gets alone
    (mlx_generate with the same block size, sampling parameters and seed)."""

    def __init__(self, model: Model, prefill_chunk: int = PREFILL_CHUNK):
        self.model = model
        self.prefill_chunk = prefill_chunk
        self.cache = [BatchLayerCache() for _ in model.layers]
        self.active: List[Row] = []  # in the batch cache, in row order
        self.waiting: List[Row] = []  # prefilling, first come first served
        self.next_uid = 0

    def insert(self, prompt: Union[Sequence[int], mx.array], max_tokens: int = 256,
               temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
               seed: Optional[int] = None, block_size: Union[int, str, BlockPolicy, None] = None,
               eos_token_id: Union[int, Iterable[int], None] = None, use_diffusion: bool = True, *,
               logprobs: bool = False, logits_processors: Optional[List[Any]] = None,
               prompt_cache: Optional[List[Any]] = None, **processing: Any) -> int:
        """Queue a sequence; returns its uid. Options are `mlx_generate`'s (`processing`: min_p,
        the penalties, logit_bias), `logprobs` `mlx_generate_steps`'s.

        `prompt_cache` (the model's `make_cache()` kind) may hold the keys and values of the
        prompt's first tokens, all but one at most; only the rest is prefilled. When the row
        leaves (finished or removed), the list is refilled in place with what the row's cache
        holds: the prompt and every emitted token but the last, maybe a few drafts past a stop,
        as `PromptCache.commit` expects."""
        refuse_sampler(processing)
        prompt = as_token_list(prompt)
        params = SamplingParams(temperature, top_p, top_k, seed, **processing)
        processors = logits_processors_for(params, self.model.args.vocab_size) + list(logits_processors or [])
        cache = self.model.make_cache() if prompt_cache is None else prompt_cache
        cached = cache[0].offset
        if any(c.offset != cached for c in cache) or cached >= max(len(prompt), 1):
            raise ValueError(f"The prompt cache must hold fewer positions than the prompt's {len(prompt)}, "
                             f"the same in every layer; it holds {[c.offset for c in cache]}")
        backend = MLXBackend(self.model, cache, seed, logprobs, processors=processors)
        check_request(prompt, max_tokens, backend)
        policy = block_policy(block_size, use_diffusion and self.model.has_diffusion,
                              self.model.block_size, lambda: adaptive_block(self.model))
        eos = eos_set(eos_token_id) | eos_set(self.model.args.eos_token_id)
        row = Row(self.next_uid, prompt, max_tokens, params, policy, eos, backend, random.Random(seed),
                  prompt_cache, prefilled=cached)
        self.next_uid += 1
        self.waiting.append(row)
        return row.uid

    def remove(self, uid: int) -> None:
        """Drop a sequence, finished or not (a cancelled request, a stop string)."""
        self.waiting = [r for r in self.waiting if r.uid != uid]  # its cache holds what it prefilled
        keep = [i for i, r in enumerate(self.active) if r.uid != uid]
        if len(keep) < len(self.active):
            leaving = next(i for i, r in enumerate(self.active) if r.uid == uid)
            row = self.active[leaving]
            if row.prompt_cache is not None:
                row.prompt_cache[:] = [c.row(leaving, row.length) for c in self.cache]
            for c in self.cache:
                c.keep_rows(keep)
            self.active = [self.active[i] for i in keep]

    def __len__(self) -> int:
        return len(self.active) + len(self.waiting)

    def step(self) -> List[Emitted]:
        """One prefill chunk of the first newcomer, then one draft+verify step of the batch:
        an `Emitted` per sequence that emitted; finished ones have left."""
        out = self._prefill_chunk() if self.waiting else []
        if self.active:
            out += self._decode_step()
        for emitted in out:
            if emitted.finished:
                self.remove(emitted.uid)
        return out

    def _prefill_chunk(self) -> List[Emitted]:
        row = self.waiting[0]
        if row.max_tokens == 0:
            self.waiting.pop(0)
            return [Emitted(row.uid, [], True)]
        cache = row.backend.cache
        rest = row.prompt[row.prefilled:]
        if len(rest) > self.prefill_chunk:
            self.model(mx.array(rest[: self.prefill_chunk])[None], cache=cache)
            mx.eval([c.state for c in cache])
            row.prefilled += self.prefill_chunk
            return []
        logits = self.model(mx.array(rest)[None], cache=cache)[0, -1]
        if row.backend.processors:
            row.backend.history = mx.array(row.prompt, dtype=mx.int32)
        row.token = row.backend.first_token(logits, row.params)
        row.prefilled, row.length, row.emitted = len(row.prompt), len(row.prompt), 1
        self.waiting.pop(0)
        finished = row.token in row.eos or row.max_tokens == 1
        if not finished:
            for layer, c in zip(self.cache, cache):
                layer.append_row(c.keys[:, :, : c.offset], c.values[:, :, : c.offset])
            row.backend.cache = None  # the batch holds it now
            if row.prompt_cache is not None:
                row.prompt_cache[:] = self.model.make_cache()  # until `remove` refills it
            self.active.append(row)
        first = row.backend.prefill_logprobs
        return [Emitted(row.uid, [row.token], finished, None if first is None else [first])]

    def _decode_step(self) -> List[Emitted]:
        tic = time.perf_counter()
        rows = self.active
        lengths = [r.length for r in rows]
        block = [r.policy.length(r.max_tokens - r.emitted, r.length) for r in rows]
        L = max(block)
        drafted: List[Any] = [None] * len(rows)
        if L > 1:
            mask_id = self.model.mask_token_id
            tokens = mx.array([[r.token] + [mask_id] * (L - 1) for r in rows], dtype=mx.int32)
            visible = mx.array([[n] * L for n in block], dtype=mx.int32)
            logits = batch_pass(self.model, tokens, self.cache, lengths, "draft", visible)
            for b, r in enumerate(rows):
                if block[b] > 1:
                    drafted[b] = r.backend.drafts_from(r.token, logits[b, : block[b] - 1], r.params)
        pad = mx.zeros((L,), mx.int32)
        tokens = mx.stack([
            mx.concatenate([mx.array([r.token], mx.int32)] + ([] if d is None else [d[0]]) + [pad])[:L]
            for r, d in zip(rows, drafted)
        ])
        visible = mx.broadcast_to(mx.arange(1, L + 1, dtype=mx.int32), (len(rows), L))
        logits = batch_pass(self.model, tokens, self.cache, lengths, "verify", visible)
        arrays = [
            r.backend.score(r.backend.verified(logits[b, : block[b]], tokens[b, : block[b]]), drafted[b], r.params)
            for b, r in enumerate(rows)
        ]
        mx.eval([a for row_arrays in arrays for a in row_arrays if a is not None])
        seconds = time.perf_counter() - tic

        out = []
        for r, n, row_arrays in zip(rows, block, arrays):
            scores = scores_from(*row_arrays)
            m = accept(scores, r.params, r.rng)
            r.backend.trim_history(n - 1 - m)
            r.length += m + 1
            r.policy.update(n, m + 1, seconds)
            new = scores.draft[:m] + [scores.target[m]]
            cut = next((i + 1 for i, t in enumerate(new) if t in r.eos), len(new))
            new = new[: min(cut, r.max_tokens - r.emitted)]
            r.emitted += len(new)
            r.token = new[-1]
            r.steps.append(len(new))
            rows_lp = None if scores.logprobs is None else [scores.logprobs[i] for i in range(len(new))]
            out.append(Emitted(r.uid, new, r.token in r.eos or r.emitted >= r.max_tokens, rows_lp))
        return out


@dataclass
class BatchResponse:
    """`batch_generate`'s result, as mlx-lm's: texts in prompt order, plus the token ids and
    each sequence's tokens per step."""

    texts: List[str]
    token_ids: List[List[int]]
    tokens_per_step: List[List[int]]
    seconds: float


def detokenize(tokenizer, tokens: List[int]) -> str:
    """Text as `generate` streams it (the streaming detokenizer, not `decode`, which differs
    on a leading space)."""
    detokenizer = tokenizer.detokenizer
    detokenizer.reset()
    for token in tokens:
        detokenizer.add_token(token)
    detokenizer.finalize()
    return detokenizer.text


def batch_generate(model: Model, tokenizer, prompts: List[Union[str, List[int]]],
                   max_tokens: Union[int, List[int]] = 128, block_size: Union[int, str, None] = None,
                   verbose: bool = False, **kwargs) -> BatchResponse:
    """Generate for every prompt at once, decoded together; each text is exactly what
    `generate` gives that prompt alone. `kwargs` are `BatchDecoder.insert`'s sampling options."""
    if isinstance(max_tokens, int):
        max_tokens = [max_tokens] * len(prompts)
    decoder = BatchDecoder(model)
    eos = list(tokenizer.eos_token_ids)
    uids = []
    for prompt, limit in zip(prompts, max_tokens):
        if isinstance(prompt, str):
            prompt = tokenizer.encode(prompt, add_special_tokens=add_special_tokens(tokenizer, prompt))
        uids.append(decoder.insert(prompt, limit, block_size=block_size, eos_token_id=eos, **kwargs))
    rows = {r.uid: r for r in decoder.waiting}
    tokens: Dict[int, List[int]] = {uid: [] for uid in uids}
    tic = time.perf_counter()
    done = 0
    while len(decoder):
        for uid, new, finished, _ in decoder.step():
            tokens[uid] += new
            done += finished
            if verbose and finished:
                print(f"[batch_generate] Finished {done}/{len(uids)}", end="\r")
    if verbose:
        print()
    ids = [[t for t in tokens[uid] if t not in rows[uid].eos] for uid in uids]
    return BatchResponse(
        texts=[detokenize(tokenizer, t) for t in ids],
        token_ids=ids,
        tokens_per_step=[rows[uid].steps for uid in uids],
        seconds=time.perf_counter() - tic,
    )
