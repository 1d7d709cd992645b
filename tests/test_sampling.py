"""Speculative sampling is exact: Orthrus samples follow the base model's distribution."""

from collections import Counter

import numpy as np
import pytest

from orthrus_mlx import load_model, mlx_generate
from orthrus_mlx.testing import random_weights, save_checkpoint, tiny_config, tiny_llama_config
from reference import NaiveOrthrus, chi_square_p, exact_distribution, softmax

PROMPT = [1, 2, 0]
LENGTH = 4  # first token from the prefill, then a step drafting 2 tokens, maybe one more


@pytest.fixture(scope="module")
def tiny_vocab_of(tmp_path_factory):
    """The tiny-vocabulary model of an architecture (Qwen3 or Llama), built once."""
    built = {}

    def get(make_config):
        if make_config not in built:
            config = make_config(
                vocab_size=4, mask_token_id=3, eos_token_id=None, block_size=4, num_hidden_layers=1,
                hidden_size=32, head_dim=8, intermediate_size=64,
            )
            weights = random_weights(config, seed=21, scale=0.1)
            path = save_checkpoint(tmp_path_factory.mktemp("ck"), config, weights, tokenizer=False)
            model, _ = load_model(path)
            built[make_config] = model, NaiveOrthrus(config, weights), config
        return built[make_config]

    return get


@pytest.fixture
def tiny_vocab(tiny_vocab_of):
    return tiny_vocab_of(tiny_config)


@pytest.mark.parametrize(
    "make_config,processing,draws,block_size",
    [
        (tiny_config, dict(temperature=1.0, top_k=0, top_p=1.0), 3000, None),
        (tiny_config, dict(temperature=0.7, top_k=3, top_p=1.0), 2000, None),
        (tiny_config, dict(temperature=1.5, top_k=0, top_p=0.8), 2000, None),
        (tiny_config, dict(temperature=1.0, top_k=0, top_p=1.0), 2000, "auto"),
        (tiny_llama_config, dict(temperature=0.7, top_k=3, top_p=1.0), 2000, None),
    ],
    ids=["qwen3", "qwen3-top-k", "qwen3-top-p", "qwen3-auto", "llama-top-k"],
)
def test_orthrus_samples_follow_the_base_distribution(
    tiny_vocab_of, make_config, processing, draws, block_size, tmp_path, monkeypatch
):
    monkeypatch.setenv("ORTHRUS_MLX_CACHE", str(tmp_path))
    model, naive, config = tiny_vocab_of(make_config)
    expected = exact_distribution(naive, PROMPT, LENGTH, config["vocab_size"], **processing)
    observed = Counter()
    for seed in range(draws):
        out = tuple(mlx_generate(model, PROMPT, None, LENGTH, seed=seed, block_size=block_size, **processing))
        observed[out] += 1
    p = chi_square_p(observed, expected, draws)
    assert p > 1e-3, f"chi-square p = {p:.2e}"
    assert sum(observed.values()) == draws


def test_chi_square_rejects_the_diffusion_distribution(tiny_vocab):
    """Guards the test above: drafts emitted without verification must be caught."""
    model, naive, config = tiny_vocab
    processing = dict(temperature=1.0, top_k=0, top_p=1.0)
    expected = exact_distribution(naive, PROMPT, LENGTH, config["vocab_size"], **processing)
    rng = np.random.default_rng(0)
    observed = Counter()
    import mlx.core as mx

    for _ in range(1500):
        cache = model.make_cache()
        first_logits = np.array(model(mx.array([PROMPT]), cache=cache)[0, -1])
        first = int(rng.choice(4, p=softmax(first_logits.astype(np.float64))))
        q = np.array(model.draft(mx.array([[first, 3, 3, 3]]), cache)[0, :-1]).astype(np.float64)
        observed[(first,) + tuple(int(rng.choice(4, p=softmax(row))) for row in q)] += 1
    assert chi_square_p(observed, expected, 1500) < 1e-3


def test_same_seed_same_output(tiny_vocab):
    model, _, _ = tiny_vocab
    runs = [list(mlx_generate(model, PROMPT, None, 30, temperature=1.0, seed=s)) for s in (5, 5, 6)]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]
