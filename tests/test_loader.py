"""Checkpoints in Hugging Face layout round-trip through `load`: folders, shards, dtypes, hub ids."""

import json
import shutil
import warnings

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from orthrus_mlx import DecodeStats, load, load_model, load_model_and_tokenizer, mlx_generate
from orthrus_mlx.testing import random_checkpoint, random_weights, tiny_config


def logits_of(model, tokens=(5, 6, 7, 8)):
    cache = model.make_cache()
    ar = model(mx.array([tokens]), cache=cache)
    return np.array(ar), np.array(model.draft(mx.array([[9] + [259] * 7]), cache))


def test_random_checkpoint_round_trips(tmp_path):
    config = tiny_config(tie_word_embeddings=False)
    weights = random_weights(config, seed=4)
    model, tokenizer = load(random_checkpoint(tmp_path, config, seed=4))
    loaded = dict(tree_flatten(model.parameters()))
    assert set(loaded) == set(weights)
    for name, value in weights.items():
        assert np.array_equal(np.array(loaded[name]), value), name
    assert model.block_size == 8 and model.mask_token_id == 259
    assert tokenizer.decode(tokenizer.encode("def f(x):\n    return x")) == "def f(x):\n    return x"
    assert load_model_and_tokenizer is load


def test_sharded_checkpoint_equals_single_file(tmp_path):
    one, _ = load_model(random_checkpoint(tmp_path / "one", seed=3))
    three, _ = load_model(random_checkpoint(tmp_path / "three", seed=3, shards=3))
    assert len(list((tmp_path / "three").glob("model-*.safetensors"))) == 3
    for a, b in zip(logits_of(one), logits_of(three)):
        assert np.array_equal(a, b)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_checkpoint_dtype_is_kept_unless_asked(tmp_path, dtype):
    path = random_checkpoint(tmp_path, dtype=dtype)
    model, _ = load_model(path)
    assert {v.dtype for _, v in tree_flatten(model.parameters())} == {getattr(mx, dtype)}
    model32, _ = load_model(path, dtype="float32")
    assert {v.dtype for _, v in tree_flatten(model32.parameters())} == {mx.float32}
    out = list(mlx_generate(model, [1, 2, 3], None, 12))
    assert len(out) == 12


def test_eos_ids_join_config_and_generation_config(tmp_path):
    path = random_checkpoint(tmp_path, tiny_config(eos_token_id=[256, 258]))
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": 257}))
    model, tokenizer = load(path)
    assert model.args.eos_token_id == [256, 257, 258]
    assert {256, 257, 258} <= set(tokenizer.eos_token_ids)


def test_plain_qwen3_runs_in_ar_mode_with_one_warning(tmp_path):
    config = tiny_config()
    del config["block_size"], config["mask_token_id"]
    config["architectures"] = ["Qwen3ForCausalLM"]
    path = random_checkpoint(tmp_path, config)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, _ = load(path)
    messages = [str(w.message) for w in caught if "AR mode" in str(w.message)]
    assert len(messages) == 1 and "block_size" in messages[0]
    stats = DecodeStats()
    out = list(mlx_generate(model, [1, 2, 3], None, 10, stats=stats))
    assert len(out) == 10 and stats.tokens_per_step == [1] * 9
    with pytest.raises(ValueError, match="no diffusion view"):
        model.draft(mx.array([[1, 2]]), model.make_cache())


def test_hub_repo_id_resolves_through_huggingface_hub(tmp_path, monkeypatch):
    """A repo id goes through huggingface_hub's snapshot_download (offline, from its cache)."""
    from huggingface_hub import constants

    source = random_checkpoint(tmp_path / "src", seed=8)
    repo = tmp_path / "hub" / "models--orthrus-test--tiny"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(source, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)

    model, tokenizer = load("orthrus-test/tiny")
    local, _ = load_model(source)
    for a, b in zip(logits_of(model), logits_of(local)):
        assert np.array_equal(a, b)
    with pytest.raises(FileNotFoundError, match="orthrus-test/missing"):
        load("orthrus-test/missing")
