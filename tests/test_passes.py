"""The compiled decoding passes against the naive numpy Orthrus and mlx-lm's Qwen3.

The backend decodes with these passes, not with `Model.__call__`/`Model.draft`,
so they are checked on their own against the independent references, with the
rotary angles shared per pass (the CPU path) and with the model's RoPE (Metal).
"""

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.cache import KVCache

from orthrus_mlx.loader import load_model
from orthrus_mlx.passes import CompiledPasses
from orthrus_mlx.testing import random_checkpoint, random_weights, tiny_config
from reference import NaiveOrthrus
from test_model import mlx_lm_qwen3


@pytest.fixture(params=[True, False], ids=["shared-rope", "model-rope"])
def shared_rope(request):
    return request.param


@pytest.mark.parametrize("tied,kv_heads,block", [(True, 2, 8), (False, 1, 4)])
def test_draft_pass_equals_naive_reference(tmp_path, shared_rope, tied, kv_heads, block):
    config = tiny_config(tie_word_embeddings=tied, num_key_value_heads=kv_heads, block_size=block)
    weights = random_weights(config, seed=11)
    model, _ = load_model(random_checkpoint(tmp_path, config, seed=11))
    passes, naive = CompiledPasses(model, shared_rope), NaiveOrthrus(config, weights)
    rng = np.random.default_rng(12)
    for n in (1, 9, 40):
        prefix = rng.integers(0, 256, n)
        for length in (2, block):
            tokens = np.array([rng.integers(0, 256)] + [config["mask_token_id"]] * (length - 1))
            cache = model.make_cache()
            model(mx.array(prefix)[None], cache=cache)
            got = np.array(passes(mx.array(tokens)[None], cache, "draft")[0])
            assert cache[0].offset == n, "the draft pass must leave the cache as it was"
            assert np.abs(got - naive.draft(prefix, tokens)).max() < 1e-4, f"prefix {n}, length {length}"


def test_verify_pass_equals_mlx_lm_qwen3(tmp_path, shared_rope):
    config = tiny_config()
    weights = random_weights(config, seed=13)
    model, _ = load_model(random_checkpoint(tmp_path, config, seed=13))
    passes, reference = CompiledPasses(model, shared_rope), mlx_lm_qwen3(config, weights)
    tokens = mx.array(np.random.default_rng(14).integers(0, 256, (1, 300)))
    ours, theirs = model.make_cache(), [KVCache() for _ in range(2)]
    model(tokens[:, :250], cache=ours)
    reference(tokens[:, :250], cache=theirs)
    # Block lengths 1..8 in turn; 250 + 8 crosses mlx-lm's 256-slot allocation step.
    start = 250
    for length in (1, 8, 3, 1, 5):
        chunk = tokens[:, start : start + length]
        got = passes(chunk, ours, "verify")
        want = reference(chunk, cache=theirs)
        assert np.abs(np.array(got) - np.array(want)).max() < 1e-5, f"length {length}"
        start += length
    assert ours[0].offset == start


def test_passes_follow_trimmed_cache(tmp_path):
    """After a verify pass is trimmed back, the next pass sees only the kept entries."""
    config = tiny_config()
    model, _ = load_model(random_checkpoint(tmp_path, config, seed=15))
    passes = CompiledPasses(model)
    prefix = mx.array([[5, 6, 7, 8]])
    kept, fresh = model.make_cache(), model.make_cache()
    model(prefix, cache=kept)
    model(prefix, cache=fresh)
    passes(mx.array([[9, 10, 11, 12]]), kept, "verify")
    for c in kept:
        c.trim(2)
    model(mx.array([[9, 10]]), cache=fresh)
    block = mx.array([[13, config["mask_token_id"], config["mask_token_id"]]])
    assert np.abs(np.array(passes(block, kept, "draft")) - np.array(model.draft(block, fresh))).max() < 1e-5
    assert np.abs(np.array(passes(block, kept, "verify")) - np.array(model(block, cache=fresh))).max() < 1e-5


def test_ar_only_checkpoint_has_no_draft_pass(tmp_path):
    config = tiny_config(architectures=["Qwen3ForCausalLM"])
    del config["block_size"], config["mask_token_id"]
    with pytest.warns(UserWarning, match="AR mode"):
        model, _ = load_model(random_checkpoint(tmp_path, config, seed=16))
    passes = CompiledPasses(model)
    cache = model.make_cache()
    assert passes(mx.array([[1, 2]]), cache, "verify").shape == (1, 2, config["vocab_size"])
    with pytest.raises(ValueError, match="no diffusion view"):
        passes(mx.array([[1, 2]]), cache, "draft")


def test_compiled_functions_outlive_their_model(tmp_path):
    """MLX finds a compiled function's traces by the wrapped function's address, so a function
    freed with its model could hand its address, and its traces, to a later model's pass. Every
    wrapped function stays alive after its model is freed (so its address is never reused) and
    holds the model only weakly."""
    import gc
    import weakref

    from orthrus_mlx import passes as passes_module

    model, _ = load_model(random_checkpoint(tmp_path, tiny_config(), seed=3))
    before = len(passes_module._COMPILED_FUNCTIONS)
    passes = CompiledPasses(model)
    compiled = [*passes.enter.values(), *passes.leave.values(), *(f for fs in passes.between.values() for f in fs)]
    functions = [weakref.ref(f) for f in passes_module._COMPILED_FUNCTIONS[before:]]
    assert len(functions) == len(compiled)
    model_alive = weakref.ref(model)
    del model, passes, compiled
    gc.collect()
    assert model_alive() is None
    assert all(f() is not None for f in functions)
