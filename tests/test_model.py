"""Both views against independent references: mlx-lm's Qwen3 and a naive numpy Orthrus."""

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models import qwen3
from mlx_lm.models.cache import KVCache

from orthrus_mlx.loader import load_model
from orthrus_mlx.testing import random_checkpoint, random_weights, save_checkpoint, tiny_config, tiny_llama_config
from reference import NaiveOrthrus


def mlx_lm_qwen3(config, weights):
    model = qwen3.Model(qwen3.ModelArgs.from_dict(config))
    base = {k: mx.array(v) for k, v in weights.items() if "_diff" not in k}
    model.load_weights(list(base.items()))
    return model


@pytest.mark.parametrize("tied", [True, False])
def test_ar_view_equals_mlx_lm_qwen3(tmp_path, tied):
    config = tiny_config(tie_word_embeddings=tied)
    weights = random_weights(config, seed=1)
    model, _ = load_model(random_checkpoint(tmp_path, config, seed=1))
    reference = mlx_lm_qwen3(config, weights)

    tokens = mx.array(np.random.default_rng(0).integers(0, 256, (1, 23)))
    ours, theirs = model.make_cache(), [KVCache() for _ in range(2)]
    for chunk in (tokens[:, :17], tokens[:, 17:20], tokens[:, 20:]):
        got, want = model(chunk, cache=ours), reference(chunk, cache=theirs)
        assert np.abs(np.array(got) - np.array(want)).max() < 1e-5


def test_ar_view_equals_naive_reference(tmp_path):
    config = tiny_config()
    weights = random_weights(config, seed=2)
    model, _ = load_model(random_checkpoint(tmp_path, config, seed=2))
    tokens = np.random.default_rng(1).integers(0, 256, 19)
    got = np.array(model(mx.array(tokens)[None])[0])
    want, _ = NaiveOrthrus(config, weights).ar(tokens)
    assert np.abs(got - want).max() < 1e-4


@pytest.mark.parametrize(
    "tied,heads,kv_heads,block",
    [(True, 4, 2, 4), (False, 4, 2, 8), (True, 4, 1, 32), (False, 2, 2, 8)],
)
def test_diffusion_view_equals_naive_reference(tmp_path, tied, heads, kv_heads, block):
    config = tiny_config(
        tie_word_embeddings=tied,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        block_size=block,
    )
    weights = random_weights(config, seed=3)
    model, _ = load_model(random_checkpoint(tmp_path, config, seed=3))
    naive = NaiveOrthrus(config, weights)
    rng = np.random.default_rng(4)
    for n in (1, 6, 37):
        prefix = rng.integers(0, 256, n)
        block_tokens = np.array([rng.integers(0, 256)] + [config["mask_token_id"]] * (block - 1))
        cache = model.make_cache()
        model(mx.array(prefix)[None], cache=cache)
        got = np.array(model.draft(mx.array(block_tokens)[None], cache)[0])
        want = naive.draft(prefix, block_tokens)
        assert got.shape == (block, config["vocab_size"])
        assert np.abs(got - want).max() < 1e-4, f"prefix {n}"


def test_diffusion_view_is_not_the_ar_view(tmp_path):
    """Guards the reference test: swapping in the AR weights must change the drafts."""
    config = tiny_config()
    weights = random_weights(config, seed=5)
    naive_ar = NaiveOrthrus(
        config, {**weights, **{k: weights[k.replace("_diff", "")] for k in weights if "_diff" in k}}
    )
    model, _ = load_model(random_checkpoint(tmp_path, config, seed=5))
    prefix, block = np.arange(10, 20), np.array([5] + [config["mask_token_id"]] * 7)
    cache = model.make_cache()
    model(mx.array(prefix)[None], cache=cache)
    got = np.array(model.draft(mx.array(block)[None], cache)[0])
    assert np.abs(got - naive_ar.draft(prefix, block)).max() > 1e-2


@pytest.mark.parametrize("make_config", [tiny_config, tiny_llama_config], ids=["qwen3", "llama"])
def test_a_tied_checkpoint_that_also_stores_lm_head_uses_the_embeddings(tmp_path, make_config):
    """Exporters may save lm_head.weight beside tied embeddings: the loader must drop it."""
    config = make_config(tie_word_embeddings=True)
    weights = random_weights(config, seed=6)
    stale = np.random.default_rng(7).standard_normal(weights["model.embed_tokens.weight"].shape)
    folder = save_checkpoint(tmp_path, config, {**weights, "lm_head.weight": stale.astype(np.float32)})
    model, _ = load_model(folder)
    tokens = np.arange(5, 17)
    got = np.array(model(mx.array(tokens)[None])[0])
    want, _ = NaiveOrthrus(config, weights).ar(tokens)
    assert np.abs(got - want).max() < 1e-4


def test_draft_leaves_the_cache_as_it_was(tmp_path):
    config = tiny_config()
    model, _ = load_model(random_checkpoint(tmp_path, config))
    cache = model.make_cache()
    # 250 + a block of 8 crosses mlx-lm's 256-slot allocation step.
    model(mx.array(np.arange(250) % 256)[None], cache=cache)
    before = [(c.offset, np.array(c.keys[..., : c.offset, :]), np.array(c.values[..., : c.offset, :])) for c in cache]
    first = np.array(model.draft(mx.array([[7] + [259] * 7]), cache))
    for c, (offset, keys, values) in zip(cache, before):
        assert c.offset == offset
        assert np.array_equal(np.array(c.keys[..., :offset, :]), keys)
        assert np.array_equal(np.array(c.values[..., :offset, :]), values)
    # Drafting again from the same state gives the same logits, and the AR
    # view continues exactly as if no draft had happened.
    assert np.array_equal(np.array(model.draft(mx.array([[7] + [259] * 7]), cache)), first)
    fresh = model.make_cache()
    model(mx.array(np.arange(250) % 256)[None], cache=fresh)
    after_draft = np.array(model(mx.array([[7, 8]]), cache=cache))
    no_draft = np.array(model(mx.array([[7, 8]]), cache=fresh))
    assert np.array_equal(after_draft, no_draft)
