"""Logits processors keep decoding exact: greedy equals mlx-lm's AR decoding with the same
processors, token for token, and sampled tokens follow the processed AR distribution."""

import itertools
import json
import math
from collections import Counter

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.generate import generate_step
from mlx_lm.models import qwen3
from mlx_lm.sample_utils import apply_min_p, make_logits_processors

from orthrus_mlx import SamplingParams, load_model, mlx_generate
from orthrus_mlx.backend import log_probs
from orthrus_mlx.core.step import DecodeStats
from orthrus_mlx.loader import DEFAULT_MODEL
from orthrus_mlx.testing import random_weights, save_checkpoint, tiny_config
from reference import NaiveOrthrus, chi_square_p, softmax

TINY = DEFAULT_MODEL  # the shipped tiny model, orthrus_mlx/assets/orthrus-tiny


@pytest.fixture(scope="module")
def tiny():
    """The shipped model, and mlx-lm's own Qwen3 holding its AR weights only."""
    model, _ = load_model(TINY)
    reference = qwen3.Model(qwen3.ModelArgs.from_dict(json.loads((TINY / "config.json").read_text())))
    weights = mx.load(str(TINY / "model.safetensors"))
    reference.load_weights([(k, v) for k, v in weights.items() if "_diff" not in k])
    return model, reference


def mlx_lm_greedy(reference, prompt, max_tokens, processing):
    processors = make_logits_processors(**processing)
    steps = generate_step(mx.array(prompt), reference, max_tokens=max_tokens, logits_processors=processors)
    return [int(t) for t, _ in steps]


PROCESSING = {
    "repetition": dict(repetition_penalty=1.8, repetition_context_size=12),
    "presence": dict(presence_penalty=1.5, presence_context_size=30),
    "frequency": dict(frequency_penalty=0.7),
    "logit-bias": dict(logit_bias={17: 4.0, 300: 6.0, 5: -3.0}),
    "all": dict(logit_bias={42: 3.0}, repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.4),
}


@pytest.mark.parametrize("name", list(PROCESSING))
def test_greedy_with_processors_equals_mlx_lm(tiny, name):
    model, reference = tiny
    processing = PROCESSING[name]
    prompt = [5, 6, 7, 8, 9, 10, 5, 6, 7, 8]
    plain = list(mlx_generate(model, prompt, [], 32, block_size=6))
    stats = DecodeStats()
    got = list(mlx_generate(model, prompt, [], 32, block_size=6, stats=stats, **processing))
    assert got == mlx_lm_greedy(reference, prompt, 32, processing)
    assert got != plain, "the processors changed nothing: the test could not fail"
    assert sum(stats.tokens_per_step) > stats.steps, "no draft was accepted: drafting went untested"


def test_each_draft_position_sees_the_drafts_before_it(tiny):
    """Bias and presence penalty dwarfing the logits force a cycle of 6 tokens in both views: a
    draft pass that ignored the block's earlier drafts would repeat a token and be rejected."""
    model, reference = tiny
    processing = dict(logit_bias={17 + i: 1000.0 - 100 * i for i in range(6)}, presence_penalty=5000.0,
                      presence_context_size=5)
    stats = DecodeStats()
    got = list(mlx_generate(model, [5, 6, 7], [], 30, block_size=6, stats=stats, **processing))
    assert got == mlx_lm_greedy(reference, [5, 6, 7], 30, processing) == [17, 18, 19, 20, 21, 22] * 5
    assert stats.tokens_per_step == [6, 6, 6, 6, 5]


def test_history_seeds_what_a_prompt_cache_holds(tiny):
    """A cached prefix is history only if the caller says so (mlx-lm's processors see the prompt)."""
    model, reference = tiny
    processing = PROCESSING["repetition"]
    first, rest = [5, 6, 7, 8], [9, 10, 5, 6]
    cache = model.make_cache()
    list(mlx_generate(model, first, [], 1, prompt_cache=cache, block_size=6))
    assert cache[0].offset == len(first)  # the token generated is pending, not cached
    got = list(mlx_generate(model, rest, [], 30, prompt_cache=cache, history=first, block_size=6, **processing))
    assert got == mlx_lm_greedy(reference, first + rest, 30, processing)


def test_a_custom_sampler_is_refused(tiny):
    model, _ = tiny
    with pytest.raises(ValueError, match="sampler"):
        list(mlx_generate(model, [1, 2], [], 4, sampler=lambda logprobs: mx.argmax(logprobs, -1)))


@pytest.mark.parametrize(
    "bad",
    [dict(min_p=1.5), dict(repetition_penalty=-1), dict(presence_context_size=0), dict(logit_bias={"x": 1}),
     dict(logit_bias={3: float("nan")}), dict(min_tokens_to_keep=0)],
)
def test_bad_processing_values_are_refused(bad):
    with pytest.raises(ValueError):
        SamplingParams(temperature=1.0, **bad)


def test_logit_bias_outside_the_vocabulary_is_refused(tiny):
    model, _ = tiny
    with pytest.raises(ValueError, match="outside the vocabulary"):
        list(mlx_generate(model, [1, 2], [], 4, logit_bias={model.args.vocab_size: 1.0}))


def test_min_p_is_mlx_lms_filter_on_the_untempered_distribution():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 2, (3, 50)).astype(np.float32)
    params = SamplingParams(temperature=0.6, min_p=0.15, min_tokens_to_keep=3)
    got = np.exp(np.array(log_probs(mx.array(logits), params)))
    for row, p in zip(logits.astype(np.float64), got):
        base = softmax(row)
        keep = base >= 0.15 * base.max()
        keep[np.argsort(base)[-3:]] = True
        want = np.where(keep, softmax(row / 0.6), 0.0)
        np.testing.assert_allclose(p, want / want.sum(), atol=1e-6)
    # the same support as the function mlx-lm's make_sampler applies
    lp = mx.array(logits) - mx.logsumexp(mx.array(logits), axis=-1, keepdims=True)
    assert np.array_equal(np.isfinite(np.array(apply_min_p(lp, 0.15, 3))), got > 0)


# ---- the sampling law -------------------------------------------------------------------

PROMPT = [1, 2, 0, 2]
LENGTH = 4


def numpy_processed(logits, history, temperature=1.0, logit_bias=None, repetition_penalty=0.0,
                    repetition_context_size=20, presence_penalty=0.0, presence_context_size=20,
                    frequency_penalty=0.0, frequency_context_size=20, min_p=0.0):
    """mlx-lm's processors (bias, repetition, presence, frequency, in its order) then min-p, in numpy."""
    x = logits.astype(np.float64).copy()
    for t, b in (logit_bias or {}).items():
        x[t] += b
    if repetition_penalty:
        for t in set(history[-repetition_context_size:]):
            x[t] = x[t] * repetition_penalty if x[t] < 0 else x[t] / repetition_penalty
    if presence_penalty:
        for t in set(history[-presence_context_size:]):
            x[t] -= presence_penalty
    if frequency_penalty:
        for t in history[-frequency_context_size:]:
            x[t] -= frequency_penalty
    p = softmax(x)
    if min_p:
        p = np.where(p >= min_p * p.max(), p, 0.0)
    p = np.where(p > 0, p ** (1 / temperature), 0.0)
    return p / p.sum()


def processed_distribution(naive, vocab, **processing):
    """P(continuation | PROMPT) under the processors, by enumeration over every continuation."""
    probs = {}
    for seq in itertools.product(range(vocab), repeat=LENGTH):
        logits, _ = naive.ar(np.array(PROMPT + list(seq[:-1])))
        steps = logits[len(PROMPT) - 1 :]
        probs[seq] = math.prod(
            numpy_processed(steps[i], PROMPT + list(seq[:i]), **processing)[seq[i]] for i in range(LENGTH)
        )
    return probs


@pytest.fixture(scope="module")
def tiny_vocab(tmp_path_factory):
    config = tiny_config(
        vocab_size=4, mask_token_id=3, eos_token_id=None, block_size=4, num_hidden_layers=1,
        hidden_size=32, head_dim=8, intermediate_size=64,
    )
    weights = random_weights(config, seed=21, scale=0.1)
    path = save_checkpoint(tmp_path_factory.mktemp("ck"), config, weights, tokenizer=False)
    return load_model(path)[0], NaiveOrthrus(config, weights)


PROCESSED = dict(temperature=1.0, repetition_penalty=3.0, repetition_context_size=3, logit_bias={3: 1.5, 0: -1.0},
                 frequency_penalty=0.5, min_p=0.05)


def test_sampled_tokens_follow_the_processed_ar_distribution(tiny_vocab):
    """The block drafts 2 tokens after the prefill's: their processors see the drafts before them."""
    model, naive = tiny_vocab
    expected = processed_distribution(naive, 4, **PROCESSED)
    draws = 600
    observed = Counter(
        tuple(mlx_generate(model, PROMPT, None, LENGTH, seed=seed, block_size=4, **PROCESSED))
        for seed in range(draws)
    )
    assert chi_square_p(observed, expected, draws) > 1e-3
    # Guard: the processors move the distribution far enough that ignoring them would fail.
    plain = processed_distribution(naive, 4)
    assert chi_square_p(observed, plain, draws) < 1e-3
