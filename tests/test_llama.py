"""The Llama view against independent references: mlx-lm's Llama and the naive numpy Orthrus.

Both the model's own passes (`__call__`, `draft`) and the compiled ones the backend decodes
with, on random Llama checkpoints (GQA, tied and untied heads, Llama rotary variants).
"""

import warnings

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.generate import generate_step
from mlx_lm.models import llama
from mlx_lm.models.cache import KVCache

from orthrus_mlx import DecodeStats, load_model, mlx_generate
from orthrus_mlx.models import architecture, model_classes
from orthrus_mlx.passes import CompiledPasses
from orthrus_mlx.testing import random_checkpoint, random_weights, save_checkpoint, tiny_llama_config
from reference import NaiveOrthrus

LLAMA3_SCALING = {
    "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}


def mlx_lm_llama(config, weights):
    model = llama.Model(llama.ModelArgs.from_dict(config))
    model.load_weights([(k, mx.array(v)) for k, v in weights.items() if "_diff" not in k])
    return model


def checkpoint(tmp_path, seed, **overrides):
    config = tiny_llama_config(**overrides)
    weights = random_weights(config, seed=seed)
    model, _ = load_model(random_checkpoint(tmp_path, config, seed=seed))
    return config, weights, model


@pytest.mark.parametrize(
    "overrides",
    [{}, {"tie_word_embeddings": False}, {"rope_scaling": LLAMA3_SCALING}, {"rope_traditional": True}],
    ids=["tied", "untied", "llama3-rope", "traditional-rope"],
)
def test_ar_view_and_verify_pass_equal_mlx_lm_llama(tmp_path, overrides):
    config, weights, model = checkpoint(tmp_path, 1, **overrides)
    reference = mlx_lm_llama(config, weights)
    assert "q_norm" not in model.layers[0].self_attn and "q_norm_diff" not in model.layers[0].self_attn
    passes = CompiledPasses(model)
    tokens = mx.array(np.random.default_rng(0).integers(0, 256, (1, 290)))
    mine, compiled, theirs = model.make_cache(), model.make_cache(), [KVCache() for _ in range(2)]
    # 250 + 8 crosses mlx-lm's 256-slot allocation step; positions reach past the llama3 window.
    start = 0
    for length in (250, 1, 8, 3, 5):
        chunk = tokens[:, start : start + length]
        want = np.array(reference(chunk, cache=theirs))
        assert np.abs(np.array(model(chunk, cache=mine)) - want).max() < 1e-5, f"length {length}"
        assert np.abs(np.array(passes(chunk, compiled, "verify")) - want).max() < 1e-5, f"length {length}"
        start += length


@pytest.mark.parametrize(
    "tied,heads,kv_heads,block,head_dim",
    [(True, 4, 2, 4, 16), (False, 4, 2, 8, 16), (True, 4, 1, 32, 16), (False, 2, 2, 8, 24)],
)
def test_diffusion_view_equals_naive_reference(tmp_path, tied, heads, kv_heads, block, head_dim):
    config, weights, model = checkpoint(
        tmp_path, 3, tie_word_embeddings=tied, num_attention_heads=heads,
        num_key_value_heads=kv_heads, block_size=block, head_dim=head_dim,
    )
    naive = NaiveOrthrus(config, weights)
    passes = {shared: CompiledPasses(model, shared) for shared in (True, False)}
    assert passes[True].shared_rope, "plain Llama rotary should take the shared-angles CPU path"
    rng = np.random.default_rng(4)
    for n in (1, 6, 37):
        prefix = rng.integers(0, 256, n)
        block_tokens = np.array([rng.integers(0, 256)] + [config["mask_token_id"]] * (block - 1))
        want = naive.draft(prefix, block_tokens)
        cache = model.make_cache()
        ar = np.array(model(mx.array(prefix)[None], cache=cache)[0])
        assert np.abs(ar - naive.ar(prefix)[0]).max() < 1e-4
        got = [np.array(model.draft(mx.array(block_tokens)[None], cache)[0])]
        got += [np.array(p(mx.array(block_tokens)[None], cache, "draft")[0]) for p in passes.values()]
        assert cache[0].offset == n, "drafting must leave the cache as it was"
        for g in got:
            assert np.abs(g - want).max() < 1e-4, f"prefix {n}"


def test_diffusion_view_is_not_the_ar_view(tmp_path):
    """Guards the reference test: the naive draft with the AR weights in place is far off."""
    config, weights, model = checkpoint(tmp_path, 5)
    swapped = {**weights, **{k: weights[k.replace("_diff", "")] for k in weights if "_diff" in k}}
    prefix, block = np.arange(10, 20), np.array([5] + [config["mask_token_id"]] * 7)
    cache = model.make_cache()
    model(mx.array(prefix)[None], cache=cache)
    got = np.array(model.draft(mx.array(block)[None], cache)[0])
    assert np.abs(got - NaiveOrthrus(config, swapped).draft(prefix, block)).max() > 1e-2


def test_scaled_or_interleaved_rotary_keeps_the_models_rope(tmp_path):
    for overrides in ({"rope_scaling": LLAMA3_SCALING}, {"rope_traditional": True}):
        _, _, model = checkpoint(tmp_path / str(len(overrides)), 6, **overrides)
        assert not CompiledPasses(model, shared_rope=True).shared_rope


@pytest.mark.parametrize("block_size", [2, 5, 16])
def test_greedy_equals_mlx_lm_ar_decoding(tmp_path, block_size):
    config = tiny_llama_config(vocab_size=24, mask_token_id=23, eos_token_id=None, block_size=8)
    weights = random_weights(config, seed=11)
    # Diffusion weights copied from the AR view: random, yet drafts that often agree.
    weights.update({k: weights[k.replace("_diff", "")] for k in weights if "_diff" in k})
    model, _ = load_model(save_checkpoint(tmp_path, config, weights, tokenizer=False))
    reference = mlx_lm_llama(config, weights)
    rng = np.random.default_rng(block_size)
    accepted = 0
    for trial in range(5):
        prompt = rng.integers(0, 23, rng.integers(1, 30)).tolist()
        max_tokens = int(rng.integers(1, 40))
        stats = DecodeStats()
        got = list(mlx_generate(model, prompt, None, max_tokens, block_size=block_size, stats=stats))
        want = [int(t) for t, _ in generate_step(mx.array(prompt), reference, max_tokens=max_tokens)]
        assert got == want, f"trial {trial}"
        accepted += sum(stats.tokens_per_step) - stats.steps
    assert accepted > 0, "no draft was ever accepted: the acceptance path went untested"


def test_registry_picks_the_file_from_model_type():
    assert architecture("llama") == "llama" and architecture("qwen3") == "qwen3"
    assert architecture("mistral") == "llama"  # mlx-lm's own alias
    assert model_classes({"model_type": "mistral"})[0].__module__ == "orthrus_mlx.models.llama"
    with pytest.raises(ValueError, match="model_type 'gpt2' is not supported.*qwen3, llama"):
        architecture("gpt2")


def test_unsupported_or_sliding_configs_are_refused(tmp_path):
    path = random_checkpoint(tmp_path / "gpt2", tiny_llama_config(model_type="gpt2"))
    with pytest.raises(ValueError, match="not supported"):
        load_model(path)
    path = random_checkpoint(
        tmp_path / "swa", tiny_llama_config(layer_types=["sliding_attention", "full_attention"], sliding_window=8)
    )
    with pytest.raises(ValueError, match="Sliding-window"):
        load_model(path)


def test_plain_llama_runs_ar_with_one_warning(tmp_path):
    config = tiny_llama_config()
    del config["block_size"], config["mask_token_id"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, _ = load_model(random_checkpoint(tmp_path, config))
    assert len([w for w in caught if "AR mode" in str(w.message)]) == 1
    assert not model.has_diffusion and "q_proj_diff" not in model.layers[0].self_attn
    assert len(list(mlx_generate(model, [1, 2, 3], None, 5))) == 5
