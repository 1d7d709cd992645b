"""convert/ (orthrus_convert): HF safetensors -> MLX folder, cast and quantized, streamed, atomic."""

import json
import re
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

import orthrus_convert
from orthrus_convert import cli, convert, converter
from orthrus_convert.writer import ShardedWriter
from orthrus_mlx import DecodeStats, load, load_model, mlx_generate
from orthrus_mlx.testing import random_checkpoint, random_weights, save_checkpoint, tiny_config

# Widths divisible by every group size (32, 64, 128); an untied lm_head to cover it too.
CONFIG = tiny_config(
    hidden_size=128, head_dim=32, num_attention_heads=4, num_key_value_heads=2,
    intermediate_size=256, tie_word_embeddings=False,
)
PROMPTS = [[1, 2, 3, 4], [72, 101, 108, 108, 111], [200, 17, 99]]


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    return random_checkpoint(tmp_path_factory.mktemp("hf") / "src", CONFIG, shards=2)


def loaded_weights(folder: Path) -> dict:
    weights = {}
    for f in sorted(folder.glob("model*.safetensors")):
        weights.update(mx.load(str(f)))
    return weights


def greedy(model, prompt, diffusion=True, stats=None):
    return list(mlx_generate(model, prompt, max_tokens=40, use_diffusion=diffusion, stats=stats))


def assert_nothing_left(parent: Path, target: Path) -> None:
    assert not target.exists()
    assert [p.name for p in parent.iterdir() if p.name.startswith(f".{target.name}.")] == []


# 1. Unquantized round trip


def test_float32_round_trip_is_exact(source, tmp_path):
    out = convert(source, tmp_path / "f32", dtype="float32", progress=False)
    src_w, out_w = loaded_weights(source), loaded_weights(out)
    assert set(out_w) == set(src_w)
    for name, w in src_w.items():
        assert out_w[name].dtype == mx.float32 and mx.array_equal(out_w[name], w), name

    ref, _ = load(source)
    model, tokenizer = load(out)
    x = mx.array([[5, 6, 7, 8, 9]])
    assert mx.array_equal(model(x), ref(x))
    cache_a, cache_b = model.make_cache(), ref.make_cache()
    model(x, cache=cache_a), ref(x, cache=cache_b)
    block = mx.array([[9] + [CONFIG["mask_token_id"]] * 7])
    assert mx.array_equal(model.draft(block, cache_a), ref.draft(block, cache_b))
    for prompt in PROMPTS:
        assert greedy(model, prompt) == greedy(ref, prompt)
    assert tokenizer.encode("hi") == [104, 105]


def test_bfloat16_cast_matches_source_cast(source, tmp_path):
    out = convert(source, tmp_path / "bf16", dtype="bfloat16", progress=False)
    src_w, out_w = loaded_weights(source), loaded_weights(out)
    for name, w in src_w.items():
        assert out_w[name].dtype == mx.bfloat16
        assert mx.array_equal(out_w[name], w.astype(mx.bfloat16)), name
    config = json.loads((out / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16" and "quantization" not in config
    model, _ = load(out)
    assert model.model.layers[0].self_attn.q_proj_diff.weight.dtype == mx.bfloat16


def test_output_folder_has_everything_a_loader_needs(source, tmp_path):
    out = convert(source, tmp_path / "out", progress=False)
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "model.safetensors.index.json",
            "tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= names
    tokenizer_config = json.loads((out / "tokenizer_config.json").read_text())
    assert "chat_template" in tokenizer_config
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(loaded_weights(source))
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary folder left


def test_output_carries_the_source_model_card(tmp_path):
    source = random_checkpoint(tmp_path / "src", CONFIG)
    card = "---\nlicense: apache-2.0\n---\n# A model\n\nWhat it was trained on.\n"
    (source / "README.md").write_text(card)
    out = convert(source, tmp_path / "out", quantize=True, q_group_size=32, progress=False)
    assert (out / "README.md").read_text() == card


def test_sharded_output_has_an_index_that_matches(source, tmp_path):
    out = convert(source, tmp_path / "sharded", quantize=True, q_group_size=32,
                  max_file_size_gb=100e3 / 2**30, progress=False)
    shards = sorted(p.name for p in out.glob("model*.safetensors"))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    weight_map = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    for shard in shards:
        assert set(mx.load(str(out / shard))) == {k for k, v in weight_map.items() if v == shard}
    model, _ = load(out)
    assert greedy(model, PROMPTS[0]) == greedy(model, PROMPTS[0], diffusion=False)


@pytest.mark.parametrize("options", [{"dtype": "bfloat16"}, {"quantize": True, "q_group_size": 32}])
def test_block_by_block_conversion_equals_whole_tensor_conversion(source, tmp_path, monkeypatch, options):
    whole = loaded_weights(convert(source, tmp_path / "whole", progress=False, **options))
    monkeypatch.setattr(converter, "CHUNK_ELEMENTS", 1000)  # 7 rows of 128 per block
    assert len(converter.row_blocks((300, 128))) == 43
    blocks = loaded_weights(convert(source, tmp_path / "blocks", progress=False, **options))
    assert set(blocks) == set(whole)
    for name, w in whole.items():
        assert blocks[name].dtype == w.dtype and mx.array_equal(blocks[name], w), name
    if "quantize" not in options:
        for name, w in loaded_weights(source).items():
            assert mx.array_equal(blocks[name], w.astype(mx.bfloat16)), name


# 2. Quantized conversions: lossless with respect to the quantized base


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_model_loads_and_decoding_is_lossless(source, tmp_path, bits):
    out = convert(source, tmp_path / f"q{bits}", dtype="float32", quantize=True, q_bits=bits,
                  q_group_size=32, progress=False)
    config = json.loads((out / "config.json").read_text())
    expected = {"group_size": 32, "bits": bits, "mode": "affine"}
    assert config["quantization"] == expected and config["quantization_config"] == expected

    model, _ = load(out)
    for layer in [model.model.layers[0].self_attn.q_proj, model.model.layers[1].self_attn.o_proj_diff,
                  model.model.layers[1].mlp.down_proj, model.lm_head, model.model.embed_tokens]:
        assert isinstance(layer, (nn.QuantizedLinear, nn.QuantizedEmbedding))
        assert (layer.bits, layer.group_size) == (bits, 32)

    # Independent of the packing: every dequantized weight is within one step of the source
    # (MLX's affine rounding snaps zero onto the grid, so not always within half a step).
    src_w = loaded_weights(source)
    for name in ["model.layers.0.self_attn.k_proj_diff", "model.layers.1.mlp.gate_proj", "lm_head"]:
        module = dict(model.named_modules())[name]
        w = mx.dequantize(module.weight, module.scales, module.biases, 32, bits)
        step = mx.abs(mx.repeat(module.scales, 32, axis=-1))
        assert mx.all(mx.abs(w - src_w[f"{name}.weight"]) <= step * 1.001 + 1e-6).item(), name

    stats = DecodeStats()
    for prompt in PROMPTS:
        assert greedy(model, prompt, stats=stats) == greedy(model, prompt, diffusion=False)
    assert stats.steps > 0


def test_mixed_precision_views_and_embeddings(source, tmp_path):
    out = convert(source, tmp_path / "mixed", dtype="float32", quantize=True, q_bits=4,
                  q_group_size=64, diffusion_bits=8, embed_bits=0, progress=False)
    q = json.loads((out / "config.json").read_text())["quantization"]
    assert q["bits"] == 4 and q["group_size"] == 64
    assert q["model.layers.0.self_attn.q_proj_diff"] == {"group_size": 64, "bits": 8, "mode": "affine"}
    assert q["model.embed_tokens"] is False and q["lm_head"] is False
    assert "model.layers.0.self_attn.q_proj" not in q  # the base follows the top level

    model, _ = load(out)
    attn = model.model.layers[1].self_attn
    assert (attn.q_proj.bits, attn.v_proj_diff.bits, attn.o_proj_diff.bits) == (4, 8, 8)
    assert model.model.layers[0].mlp.up_proj.bits == 4
    assert type(model.model.embed_tokens) is nn.Embedding and type(model.lm_head) is nn.Linear
    for prompt in PROMPTS:
        assert greedy(model, prompt) == greedy(model, prompt, diffusion=False)


def test_unquantized_diffusion_view_keeps_source_weights(source, tmp_path):
    out = convert(source, tmp_path / "mixed", dtype="float32", quantize=True, q_group_size=32,
                  diffusion_bits=0, progress=False)
    model, _ = load(out)
    attn = model.model.layers[0].self_attn
    assert isinstance(attn.q_proj, nn.QuantizedLinear) and type(attn.q_proj_diff) is nn.Linear
    src_w = loaded_weights(source)
    assert mx.array_equal(attn.k_proj_diff.weight, src_w["model.layers.0.self_attn.k_proj_diff.weight"])
    assert mx.array_equal(attn.k_norm_diff.weight, src_w["model.layers.0.self_attn.k_norm_diff.weight"])
    assert greedy(model, PROMPTS[1]) == greedy(model, PROMPTS[1], diffusion=False)


def test_tied_embeddings_quantize_and_drop_lm_head(tmp_path):
    config = dict(CONFIG, tie_word_embeddings=True)
    weights = random_weights(dict(config, tie_word_embeddings=False))  # an exporter that kept lm_head
    src = save_checkpoint(tmp_path / "src", config, weights)
    out = convert(src, tmp_path / "q8", quantize=True, q_bits=8, q_group_size=32, progress=False)
    assert "lm_head.weight" not in loaded_weights(out)
    model, _ = load(out)
    assert isinstance(model.model.embed_tokens, nn.QuantizedEmbedding)
    assert greedy(model, PROMPTS[2]) == greedy(model, PROMPTS[2], diffusion=False)


def test_loading_a_quantized_folder_never_holds_full_precision_weights(tmp_path):
    config = tiny_config(hidden_size=512, head_dim=64, num_attention_heads=8, num_key_value_heads=4,
                         intermediate_size=1536, num_hidden_layers=4, vocab_size=2048)
    src = random_checkpoint(tmp_path / "src", config, tokenizer=False)
    with pytest.warns(UserWarning, match="No tokenizer files"):
        out = convert(src, tmp_path / "q4", quantize=True, progress=False)
    size = lambda folder: sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    mx.synchronize()
    mx.reset_peak_memory()
    # Other tests' models may still be alive in this process: count only what loading adds.
    before = mx.get_active_memory()
    model, _ = load_model(out)
    peak = mx.get_peak_memory() - before
    assert peak < 1.25 * size(out) and peak < 0.25 * size(src), (peak, size(out), size(src))


# 4. Bad inputs: a clear message, and nothing written


def rewrite_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def save_with(folder: Path, change) -> None:
    weights = random_weights(CONFIG)
    change(weights)
    for old in folder.glob("model*"):
        old.unlink()
    save_checkpoint(folder, CONFIG, weights, tokenizer=False)


def corrupt_header(folder: Path) -> None:
    file = folder / "model-00001-of-00002.safetensors"
    data = bytearray(file.read_bytes())
    data[8:20] = b"not json at!"
    file.write_bytes(bytes(data))


def truncate(folder: Path) -> None:
    file = folder / "model-00002-of-00002.safetensors"
    file.write_bytes(file.read_bytes()[:-1000])


def quantized_source(folder: Path) -> None:
    rewrite_config(folder, quantization={"group_size": 64, "bits": 4})


BAD_SOURCES = {
    "gpt2": (lambda f: rewrite_config(f, model_type="gpt2"),
             "is not an Orthrus checkpoint we can convert: model_type 'gpt2' is not supported"),
    "no_config": (lambda f: (f / "config.json").unlink(), "No config.json in"),
    "config_not_json": (lambda f: (f / "config.json").write_text("{oops"), "is not valid JSON"),
    "no_hidden_size": (lambda f: _drop_key(f, "hidden_size"), "lacks qwen3 fields"),
    "already_quantized": (quantized_source, "is already quantized"),
    "missing": (lambda f: save_with(f, lambda w: w.pop("model.layers.1.self_attn.k_proj_diff.weight")),
                "Missing tensors in the checkpoint: ['model.layers.1.self_attn.k_proj_diff.weight']"),
    "unexpected": (lambda f: save_with(f, lambda w: w.update({"model.layers.0.extra.weight": w["model.norm.weight"]})),
                   "Unexpected tensors in the checkpoint: ['model.layers.0.extra.weight']"),
    "shape": (lambda f: save_with(f, lambda w: w.update({"model.layers.1.mlp.up_proj.weight":
                                                         np.zeros((255, 128), np.float32)})),
              "Tensor model.layers.1.mlp.up_proj.weight has shape (255, 128), expected (256, 128)"),
    "corrupt_header": (corrupt_header, "Corrupt safetensors header in"),
    "truncated": (truncate, "runs past the end of the file"),
    "diff_without_config": (lambda f: _drop_key(f, "block_size"), "lacks block_size and/or mask_token_id"),
}


def _drop_key(folder: Path, key: str) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.pop(key)
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("case", sorted(BAD_SOURCES))
def test_bad_source_is_refused_by_name(source, tmp_path, case):
    import shutil

    src = shutil.copytree(source, tmp_path / "src")
    corrupt, message = BAD_SOURCES[case]
    corrupt(src)
    target = tmp_path / "out"
    with pytest.raises((ValueError, FileNotFoundError)) as e:
        convert(src, target, quantize=True, q_group_size=32, progress=False)
    assert message in str(e.value)
    assert_nothing_left(tmp_path, target)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"quantize": True, "q_bits": 7}, "Unsupported bits 7: choose one of [2, 3, 4, 5, 6, 8]"),
        ({"quantize": True, "q_group_size": 48}, "Unsupported group size 48: choose one of [32, 64, 128]"),
        ({"quantize": True, "diffusion_bits": 1}, "Unsupported --diffusion-bits 1"),
        ({"quantize": True, "embed_bits": 16}, "Unsupported --embed-bits 16"),
        ({"q_bits": 4}, "--q-bits only apply with -q/--quantize"),
        ({"dtype": "float64"}, "Unsupported dtype 'float64'"),
    ],
)
def test_bad_options_are_refused(source, tmp_path, options, message):
    with pytest.raises(ValueError) as e:
        convert(source, tmp_path / "out", progress=False, **options)
    assert message in str(e.value)
    assert_nothing_left(tmp_path, tmp_path / "out")


def test_group_size_must_divide_every_quantized_width(tmp_path):
    config = tiny_config(hidden_size=96, head_dim=32, num_attention_heads=3, num_key_value_heads=1,
                         intermediate_size=256)
    src = random_checkpoint(tmp_path / "src", config, tokenizer=False)
    with pytest.raises(ValueError) as e:
        convert(src, tmp_path / "out", quantize=True, q_group_size=64, progress=False)
    assert re.fullmatch(
        r"Group size 64 does not divide the width 96 of model\.\S+\.weight \(\d+, 96\): "
        r"choose a --q-group-size that divides it", str(e.value)), str(e.value)
    assert_nothing_left(tmp_path, tmp_path / "out")
    # The same width with a group size that divides it converts.
    with pytest.warns(UserWarning):
        convert(src, tmp_path / "out", quantize=True, q_group_size=32, progress=False)
    assert load_model(tmp_path / "out")[0].model.layers[0].self_attn.q_proj.group_size == 32


def test_existing_target_is_refused_unless_forced(source, tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="exists and is not empty; pass --force"):
        convert(source, target, progress=False)
    assert (target / "precious.txt").read_text() == "keep me"

    with pytest.raises(FileExistsError, match="--force replaces only a model folder.*holds precious.txt"):
        convert(source, target, force=True, progress=False)
    assert (target / "precious.txt").read_text() == "keep me"

    (target / "precious.txt").unlink()
    convert(source, target, progress=False)
    convert(source, target, quantize=True, q_group_size=32, force=True, progress=False)  # a model: replaced
    assert "quantization" in json.loads((target / "config.json").read_text())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]

    empty = tmp_path / "empty"
    empty.mkdir()
    convert(source, empty, progress=False)  # an empty folder is fine without --force
    assert (empty / "model.safetensors").is_file()

    with pytest.raises(ValueError, match="overlaps the source checkpoint"):
        convert(source, source, force=True, progress=False)
    assert (source / "config.json").is_file()


@pytest.mark.parametrize("error", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_interrupted_conversion_leaves_no_folder(source, tmp_path, monkeypatch, error):
    written = []
    real_write = ShardedWriter.write

    def write(self, name, parts):
        if len(written) == 5:
            raise error
        written.append(name)
        real_write(self, name, parts)

    monkeypatch.setattr(ShardedWriter, "write", write)
    target = tmp_path / "out"
    with pytest.raises(type(error)):
        convert(source, target, quantize=True, q_group_size=32, progress=False)
    assert len(written) == 5
    assert_nothing_left(tmp_path, target)
    assert list(tmp_path.iterdir()) == []


def test_interrupted_forced_conversion_keeps_the_old_folder(source, tmp_path, monkeypatch):
    target = convert(source, tmp_path / "out", progress=False)
    before = sorted(p.name for p in target.iterdir())
    monkeypatch.setattr(ShardedWriter, "close", lambda self: (_ for _ in ()).throw(OSError("boom")))
    with pytest.raises(OSError):
        convert(source, target, quantize=True, q_group_size=32, force=True, progress=False)
    assert sorted(p.name for p in target.iterdir()) == before
    assert "quantization" not in json.loads((target / "config.json").read_text())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# The command line


def test_cli_converts_and_reports_errors(source, tmp_path, capsys):
    target = tmp_path / "cli"
    argv = ["--hf-path", str(source), "--mlx-path", str(target), "-q", "--q-bits", "8",
            "--q-group-size", "32", "--diffusion-bits", "none", "--embed-bits", "6", "--no-progress"]
    assert cli.main(argv) == 0
    q = json.loads((target / "config.json").read_text())["quantization"]
    assert q["bits"] == 8 and q["model.layers.1.self_attn.q_proj_diff"] is False
    assert q["lm_head"] == {"group_size": 32, "bits": 6, "mode": "affine"}

    assert cli.main(argv) == 1
    assert "exists and is not empty; pass --force" in capsys.readouterr().err
    assert cli.main(argv + ["--force"]) == 0

    from orthrus_mlx.cli import main as orthrus_mlx_main  # `orthrus-mlx convert ...`

    assert orthrus_mlx_main(["convert"] + argv) == 1
    assert "orthrus-mlx convert: error: --mlx-path" in capsys.readouterr().err
    assert orthrus_mlx_main(["convert"] + argv + ["--force", "--q-bits", "4"]) == 0
    assert json.loads((target / "config.json").read_text())["quantization"]["bits"] == 4

    with pytest.raises(SystemExit):
        cli.main(argv[:4] + ["-q", "--q-bits", "7"])
    with pytest.raises(SystemExit):
        cli.main(argv[:4] + ["-q", "--diffusion-bits", "16"])
    assert "choose one of [2, 3, 4, 5, 6, 8] or none" in capsys.readouterr().err


def test_orthrus_mlx_convert_can_dispatch_to_the_cli():
    assert orthrus_convert.convert is convert
    assert callable(cli.add_arguments) and callable(cli.run) and callable(cli.main)


def test_a_target_that_appears_meanwhile_is_not_replaced(source, tmp_path, monkeypatch):
    target = tmp_path / "out"
    real_write = ShardedWriter.write

    def write(self, name, parts):
        if not target.exists():  # someone else writes the same folder during the run
            target.mkdir()
            (target / "theirs.txt").write_text("theirs")
        real_write(self, name, parts)

    monkeypatch.setattr(ShardedWriter, "write", write)
    with pytest.raises(FileExistsError, match="appeared during the conversion"):
        convert(source, target, progress=False)
    assert [p.name for p in target.iterdir()] == ["theirs.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
