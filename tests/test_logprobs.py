"""`stream_generate(logprobs=True)`: each token's row is the base model's own log-softmax,
checked against one plain AR pass over the whole sequence, for drafted and verified tokens."""

import mlx.core as mx
import numpy as np
import pytest

from orthrus_mlx import stream_generate

PROMPT = "Once upon a time"


def reference_rows(model, prompt, tokens):
    """Log-softmax rows of one cacheless AR pass over prompt + tokens, one per generated token."""
    sequence = mx.array(prompt + tokens[:-1])[None]
    logits = model(sequence)[0].astype(mx.float32)
    rows = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    return np.array(rows[len(prompt) - 1:])


@pytest.mark.parametrize("options", [
    dict(block_size=16),
    dict(block_size=4, temperature=0.8, top_p=0.9, seed=3),
    dict(use_diffusion=False),
], ids=["greedy", "sampled", "ar"])
def test_logprobs_equal_a_plain_ar_pass(loaded, options):
    model, tokenizer = loaded
    prompt = tokenizer.encode(PROMPT)
    responses = list(stream_generate(model, tokenizer, prompt, max_tokens=40, logprobs=True, **options))
    tokens = [r.token for r in responses]
    got = np.stack([np.array(r.logprobs) for r in responses])
    assert got.shape == (len(tokens), model.args.vocab_size)
    want = reference_rows(model, prompt, tokens)
    drafted = [r.from_draft for r in responses]
    if options.get("use_diffusion", True):
        assert any(drafted) and not all(drafted), drafted  # both kinds are checked
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    # The sampled token's own log-probability is what the server reports.
    assert all(np.isfinite(got[i, t]) for i, t in enumerate(tokens))


def test_logprobs_stay_off_by_default(loaded):
    model, tokenizer = loaded
    responses = list(stream_generate(model, tokenizer, PROMPT, max_tokens=4))
    assert all(r.logprobs is None for r in responses)


def test_logprobs_with_a_prompt_cache_holding_earlier_tokens(loaded):
    model, tokenizer = loaded
    first, second = tokenizer.encode(PROMPT), tokenizer.encode(" there was")
    cache = model.make_cache()
    for _ in stream_generate(model, tokenizer, first, max_tokens=1, prompt_cache=cache):
        pass
    # The cache now holds `first`; the generation's rows must still match the whole sequence.
    responses = list(stream_generate(model, tokenizer, second, max_tokens=20, prompt_cache=cache,
                                     block_size=8, logprobs=True))
    tokens = [r.token for r in responses]
    got = np.stack([np.array(r.logprobs) for r in responses])
    np.testing.assert_allclose(got, reference_rows(model, first + second, tokens), atol=1e-5, rtol=0)
