"""Bad input gets a clear error naming what is wrong, never a hang or a wrong answer."""

import json

import numpy as np
import pytest

from orthrus_mlx import load, load_model, mlx_generate
from orthrus_mlx.testing import random_checkpoint, random_weights, save_checkpoint, tiny_config


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    model, _ = load_model(random_checkpoint(tmp_path_factory.mktemp("ck")))
    return model


@pytest.mark.parametrize(
    "prompt,options,message",
    [
        ([], {}, "prompt is empty"),
        ([1, 300], {}, r"outside the vocabulary \[0, 300\): \[300\]"),
        ([-1, 2], {}, "outside the vocabulary"),
        ([1] * 500, {"max_tokens": 20}, "exceeds the model's context of 512"),
        ([1], {"temperature": -0.5}, r"temperature must be in \[0, 100\]"),
        ([1], {"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
        ([1], {"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
        ([1], {"top_k": -1}, "top_k must be an integer >= 0"),
        ([1], {"max_tokens": -1}, "max_tokens must be >= 0"),
    ],
)
def test_bad_generation_requests(model, prompt, options, message):
    with pytest.raises(ValueError, match=message):
        next(mlx_generate(model, prompt, None, **options))


def test_context_limit_is_exact(model):
    assert len(list(mlx_generate(model, [1] * 500, None, max_tokens=12))) == 12
    with pytest.raises(ValueError, match="exceeds"):
        next(mlx_generate(model, [1] * 500, None, max_tokens=13))


def test_missing_folder_and_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load(tmp_path / "nowhere")
    path = random_checkpoint(tmp_path / "ck")
    (path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="No model.*safetensors"):
        load(path)
    (path / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="No config.json"):
        load(path)


def test_missing_shard_is_named(tmp_path):
    path = random_checkpoint(tmp_path, shards=2)
    (path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002.safetensors"):
        load(path)


def test_wrong_shape_names_the_tensor(tmp_path):
    config = tiny_config()
    weights = random_weights(config)
    weights["model.layers.1.self_attn.k_proj_diff.weight"] = np.zeros((8, 64), np.float32)
    path = save_checkpoint(tmp_path, config, weights)
    with pytest.raises(ValueError, match=r"model.layers.1.self_attn.k_proj_diff.weight has shape \(8, 64\)"):
        load(path)


def test_unknown_and_missing_tensors_are_named(tmp_path):
    config = tiny_config()
    weights = random_weights(config)
    weights["model.layers.0.self_attn.extra_proj.weight"] = np.zeros((4, 4), np.float32)
    with pytest.raises(ValueError, match="Unexpected tensors.*extra_proj"):
        load(save_checkpoint(tmp_path / "extra", config, weights))
    weights = random_weights(config)
    del weights["model.layers.0.self_attn.q_norm_diff.weight"]
    with pytest.raises(ValueError, match="Missing tensors.*q_norm_diff"):
        load(save_checkpoint(tmp_path / "missing", config, weights))


def test_diffusion_tensors_without_orthrus_config(tmp_path):
    path = random_checkpoint(tmp_path)
    config = json.loads((path / "config.json").read_text())
    del config["block_size"]
    (path / "config.json").write_text(json.dumps(config))
    with pytest.warns(UserWarning, match="AR mode"), pytest.raises(ValueError, match="lacks block_size"):
        load(path)


def test_corrupt_safetensors_header(tmp_path):
    path = random_checkpoint(tmp_path)
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[:8] + b"{not json" + data[17:])
    with pytest.raises(ValueError, match="Corrupt safetensors header in .*model.safetensors"):
        load(path)
    (path / "model.safetensors").write_bytes(b"\xff" * 8 + data[8:100])
    with pytest.raises(ValueError, match="past the end of the file"):
        load(path)


@pytest.mark.parametrize(
    "overrides,message",
    [({"mask_token_id": 300}, "mask_token_id 300 is outside"), ({"block_size": 1}, "block_size must be >= 2")],
)
def test_bad_orthrus_fields(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        load(random_checkpoint(tmp_path, tiny_config(**overrides)))


def test_bad_dtype(tmp_path):
    with pytest.raises(ValueError, match="dtype must be one of"):
        load(random_checkpoint(tmp_path), dtype="int8")
