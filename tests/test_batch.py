"""Batched decoding: every sequence of a batch gets exactly the tokens it gets alone."""

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from orthrus_mlx import batch_generate, generate, load, mlx_generate
from orthrus_mlx.batch import BatchDecoder
from orthrus_mlx.core.sampling import SamplingParams
from orthrus_mlx.generate import mlx_generate_steps
from orthrus_mlx.prompt_cache import PromptCachePool
from orthrus_mlx.testing import random_checkpoint, tiny_llama_config

TINY = Path(__file__).resolve().parents[1] / "orthrus_mlx" / "assets" / "orthrus-tiny"
PROMPTS = [
    "def add(a, b):",
    "import os\nimport sys\n\nclass Loader:\n    def __init__(self, path):",
    "x = [",
    "for i in range(10):\n    print(i)\n# now the sum of",
]


@pytest.fixture(scope="module")
def tiny():
    return load(TINY)


def run(decoder: BatchDecoder, uids, tokens, steps: int = 10**6, emitted=None):
    """Step `decoder` (at most `steps` times), collecting each uid's tokens; the uids that finished."""
    finished = []
    for _ in range(steps):
        if not len(decoder):
            break
        for uid, new, done, _ in decoder.step():
            tokens[uid] += new
            if emitted is not None:
                emitted.append(len(new))
            if done:
                finished.append(uid)
    return finished


def test_rows_joining_and_leaving_get_their_alone_tokens(tiny):
    model, tokenizer = tiny
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    # Different block lengths (AR among them), max_tokens and arrival times in one batch.
    options = [dict(max_tokens=40, block_size=4), dict(max_tokens=25, block_size=8),
               dict(max_tokens=33, block_size=1), dict(max_tokens=12, block_size=4)]
    alone = [list(mlx_generate(model, p, **o)) for p, o in zip(prompts, options)]

    decoder = BatchDecoder(model, prefill_chunk=8)  # the longer prompts join over several steps
    tokens = {}
    uids = []
    for p, o in zip(prompts[:2], options[:2]):
        uids.append(decoder.insert(p, **o))
        tokens[uids[-1]] = []
    run(decoder, uids, tokens, steps=6)
    assert all(tokens[u] for u in uids)  # decoding before the newcomers arrive
    for p, o in zip(prompts[2:], options[2:]):
        uids.append(decoder.insert(p, **o))
        tokens[uids[-1]] = []
    emitted = []
    finished = run(decoder, uids, tokens, emitted=emitted)

    assert [tokens[u] for u in uids] == alone
    assert sorted(finished) == sorted(uids) and finished != uids  # not all at once, nor in order
    assert len(set(emitted)) > 2  # drafts were accepted, raggedly


def test_removed_row_leaves_the_others_exact(tiny):
    model, tokenizer = tiny
    prompts = [tokenizer.encode(p) for p in PROMPTS[:3]]
    alone = [list(mlx_generate(model, p, max_tokens=30, block_size=4)) for p in prompts]
    decoder = BatchDecoder(model)
    uids = [decoder.insert(p, max_tokens=30, block_size=4) for p in prompts]
    tokens = {u: [] for u in uids}
    run(decoder, uids, tokens, steps=5)
    decoder.remove(uids[1])
    run(decoder, uids, tokens)
    assert tokens[uids[0]] == alone[0] and tokens[uids[2]] == alone[2]
    assert tokens[uids[1]] == alone[1][: len(tokens[uids[1]])] and len(tokens[uids[1]]) < 30


def test_sampled_rows_draw_what_they_draw_alone(tiny):
    """Per row: the same speculative sampling rule, keys and acceptance draws as a generation alone."""
    model, tokenizer = tiny
    prompts = [tokenizer.encode(p) for p in PROMPTS[:3]]
    options = [dict(temperature=0.8, seed=1), dict(temperature=0.0), dict(temperature=1.0, top_p=0.9, seed=2)]
    alone = [list(mlx_generate(model, p, max_tokens=20, block_size=4, **o)) for p, o in zip(prompts, options)]
    decoder = BatchDecoder(model)
    uids = [decoder.insert(p, max_tokens=20, block_size=4, **o) for p, o in zip(prompts, options)]
    tokens = {u: [] for u in uids}
    run(decoder, uids, tokens)
    assert [tokens[u] for u in uids] == alone
    assert alone[0] != list(mlx_generate(model, prompts[0], max_tokens=20, block_size=4, temperature=0.8, seed=3))


def test_processed_rows_and_logprobs_as_alone(tiny):
    """Penalties, logit_bias and min-p/top-k per row, each with its own history; logprob rows
    as the base model's pass gives them alone (processed, as `mlx_generate_steps`)."""
    model, tokenizer = tiny
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    options = [
        dict(temperature=0.7, top_p=0.9, seed=4),
        dict(repetition_penalty=1.3, presence_penalty=0.5, logit_bias={32: 2.0}),
        dict(temperature=0.8, top_k=20, min_p=0.05, frequency_penalty=0.4, seed=9),
        dict(),
    ]
    alone = []
    for p, o in zip(prompts, options):
        steps = list(mlx_generate_steps(model, p, None, 16, SamplingParams(**o), block_size=4, logprobs=True))
        alone.append(([t for s in steps for t in s.tokens], [r for s in steps for r in s.logprobs]))

    decoder = BatchDecoder(model)
    uids = [decoder.insert(p, 16, block_size=4, logprobs=True, **o) for p, o in zip(prompts, options)]
    tokens, rows = {u: [] for u in uids}, {u: [] for u in uids}
    while len(decoder):
        for uid, new, _, logprobs in decoder.step():
            tokens[uid] += new
            rows[uid] += logprobs
    for uid, (alone_tokens, alone_rows) in zip(uids, alone):
        assert tokens[uid] == alone_tokens
        np.testing.assert_allclose(np.array(mx.stack(rows[uid])), np.array(mx.stack(alone_rows)), atol=1e-5)
    assert alone[1][0] != alone[3][0]  # the processors changed the greedy text


def test_llama_with_llama3_rope(tmp_path):
    """mx.fast.rope's per-row offsets (Llama 3 scaling keeps the model's own RoPE)."""
    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64}
    model, tokenizer = load(random_checkpoint(tmp_path, tiny_llama_config(rope_scaling=rope), seed=3))
    prompts = [[5, 6, 7], list(range(10, 50)), [42]]
    alone = [list(mlx_generate(model, p, max_tokens=12, block_size=4)) for p in prompts]
    decoder = BatchDecoder(model, prefill_chunk=16)
    uids = [decoder.insert(p, max_tokens=12, block_size=4) for p in prompts]
    tokens = {u: [] for u in uids}
    run(decoder, uids, tokens)
    assert [tokens[u] for u in uids] == alone


def test_batch_generate_texts_equal_generate(tiny):
    model, tokenizer = tiny
    response = batch_generate(model, tokenizer, PROMPTS, max_tokens=[20, 30, 10, 25], block_size=4)
    assert response.texts == [
        generate(model, tokenizer, p, max_tokens=n, block_size=4) for p, n in zip(PROMPTS, [20, 30, 10, 25])
    ]


def test_prompt_cache_in_and_out(tiny):
    """A row given a cache holding part of its prompt (lent by a pool) prefills the rest and gets
    its alone tokens; leaving (removed mid-prefill, or finished), it refills that cache with what
    it holds, the keys and values a fresh prefill of those tokens computes, which the pool keeps
    in place of the shorter cache it extends."""
    model, tokenizer = tiny
    prompt = tokenizer.encode(PROMPTS[1])
    options = dict(max_tokens=20, block_size=4, temperature=0.8, seed=6)
    alone = list(mlx_generate(model, prompt, **options))
    decoder, pool = BatchDecoder(model, prefill_chunk=8), PromptCachePool(model)
    lent = pool.lend(prompt)
    uid = decoder.insert(prompt, prompt_cache=lent.cache, **options)
    decoder.step()
    decoder.remove(uid)  # a client that left while its prompt prefilled
    pool.give_back(lent, prompt, [])

    lent = pool.lend(prompt)
    assert len(lent) == 8 and [c.offset for c in lent.cache] == [8] * len(lent.cache)
    other = decoder.insert(tokenizer.encode(PROMPTS[0]), max_tokens=30, block_size=4)
    uid = decoder.insert(prompt, prompt_cache=lent.cache, **options)
    tokens = {other: [], uid: []}
    run(decoder, [other, uid], tokens)
    assert tokens[uid] == alone
    pool.give_back(lent, prompt, tokens[uid])
    held = len(prompt) + len(alone) - 1
    assert [len(pc) for pc in pool.caches] == [held]
    fresh = model.make_cache()
    model(mx.array((prompt + alone)[:held])[None], cache=fresh)
    for c, f in zip(lent.cache, fresh):
        np.testing.assert_allclose(np.array(c.keys[..., :held, :]), np.array(f.keys[..., :held, :]), atol=1e-5)
        np.testing.assert_allclose(np.array(c.values[..., :held, :]), np.array(f.values[..., :held, :]), atol=1e-5)
