"""Hostile checkpoints: the loaders (MLX and PyTorch) and the converter over corrupt folders.

Every case gets one line naming the file and the field, before any data is read or any model
built: never a traceback, a read outside the model folder, a huge allocation or silently wrong
weights. The converter writes nothing for a bad source, and `--force` replaces only a model.
"""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, Tuple

import numpy as np
import pytest

from orthrus_convert import convert
from orthrus_convert.target import remove_stale_staging
from orthrus_mlx import loader
from orthrus_mlx.loader import load, load_model
from orthrus_mlx.testing import random_checkpoint, random_weights, save_checkpoint, tiny_config

NORM_A = "model.layers.0.input_layernorm.weight"  # two [64] float32 tensors
NORM_B = "model.layers.0.post_attention_layernorm.weight"
UP = "model.layers.1.mlp.up_proj.weight"
SHARD_1 = "model-00001-of-00002.safetensors"
INDEX = "model.safetensors.index.json"


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> Dict[str, Path]:
    root = tmp_path_factory.mktemp("sources")
    return {
        "single": random_checkpoint(root / "single", seed=2),
        "sharded": random_checkpoint(root / "sharded", seed=2, shards=2),
    }


# Corruptions: each edits a copy of a good folder.


def read_safetensors(file: Path) -> Tuple[Dict[str, Any], bytes]:
    data = file.read_bytes()
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def write_safetensors(file: Path, header: Any, body: bytes) -> None:
    """Hand-written bytes: an 8-byte length, the header as given (JSON or raw bytes), the data."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    file.write_bytes(len(raw).to_bytes(8, "little") + raw + body)


def header_edit(change: Callable[[Dict[str, Any]], Any]) -> Callable[[Path], None]:
    """Apply `change` to model.safetensors' header (it edits in place, or returns a new header)."""

    def corrupt(folder: Path) -> None:
        header, body = read_safetensors(folder / "model.safetensors")
        result = change(header)
        write_safetensors(folder / "model.safetensors", header if result is None else result, body)

    return corrupt


def entry(name: str, **fields) -> Callable[[Path], None]:
    return header_edit(lambda h: h[name].update(fields))


def shifted(name: str, by: int) -> Callable[[Path], None]:
    return header_edit(lambda h: h[name].update(data_offsets=[o + by for o in h[name]["data_offsets"]]))


def raw_file(content: bytes, name: str = "model.safetensors") -> Callable[[Path], None]:
    return lambda folder: (folder / name).write_bytes(content)


def config_edit(file: str = "config.json", **fields) -> Callable[[Path], None]:
    def corrupt(folder: Path) -> None:
        config = json.loads((folder / file).read_text())
        config.update(fields)
        (folder / file).write_text(json.dumps(config))

    return corrupt


def index_edit(change: Callable[[Dict[str, Any]], Any]) -> Callable[[Path], None]:
    def corrupt(folder: Path) -> None:
        index = json.loads((folder / INDEX).read_text())
        result = change(index)
        (folder / INDEX).write_text(json.dumps(index if result is None else result))

    return corrupt


def weights_edit(change: Callable[[Dict[str, np.ndarray]], None]) -> Callable[[Path], None]:
    def corrupt(folder: Path) -> None:
        weights = random_weights(tiny_config(), seed=2)
        change(weights)
        save_checkpoint(folder, tiny_config(), weights, tokenizer=False)

    return corrupt


def duplicate_in_second_shard(folder: Path) -> None:
    header1, body1 = read_safetensors(folder / SHARD_1)
    second = folder / "model-00002-of-00002.safetensors"
    header2, body2 = read_safetensors(second)
    name = next(k for k in header1 if k != "__metadata__")
    begin, end = header1[name]["data_offsets"]
    header2[name] = dict(header1[name], data_offsets=[len(body2), len(body2) + end - begin])
    write_safetensors(second, header2, body2 + body1[begin:end])


def stray_copy(name: str) -> Callable[[Path], None]:
    return lambda folder: shutil.copy(folder / "model.safetensors", folder / name)


def stray_shard(folder: Path) -> None:
    shutil.copy(folder / SHARD_1, folder / "model-extra.safetensors")


def outside_shard(name: str) -> Callable[[Path], None]:
    """The index names a shard outside the folder, which exists there (a real copy of a shard)."""

    def corrupt(folder: Path) -> None:
        target = (folder / name).resolve() if not name.startswith("/") else None
        if target is not None:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(folder / SHARD_1, target)
        moved = lambda i: i["weight_map"].update({k: name for k, v in i["weight_map"].items() if v == SHARD_1})
        index_edit(moved)(folder)

    return corrupt


def bad_field(field: str, value: Any, *named: str) -> tuple:
    """A config.json field set to `value`: the line must name the file and the field."""
    return ("single", config_edit(**{field: value}), ["config.json", field, *named])


NESTED = b"[" * 100_000 + b"]" * 100_000
# name -> (base folder, corruption, what the one line must name)
CASES = {
    # safetensors headers: offsets, sizes, types
    "overlapping_tensors": ("single", header_edit(lambda h: h[NORM_B].update(data_offsets=h[NORM_A]["data_offsets"])),
                            ["model.safetensors", "share bytes"]),
    "partly_overlapping": ("single", shifted(NORM_B, -4), ["model.safetensors", "share bytes"]),
    "data_past_the_end": ("single", shifted(NORM_B, 10**6), ["model.safetensors", NORM_B, "past the end"]),
    "size_not_dtype_times_shape": ("single", entry(NORM_B, shape=[63]), ["model.safetensors", NORM_B, "(63,)"]),
    "negative_offset": ("single", shifted(NORM_B, -10**6), ["model.safetensors", NORM_B, "occupies bytes"]),
    "offsets_reversed": ("single", header_edit(lambda h: h[NORM_B]["data_offsets"].reverse()), [NORM_B]),
    "unknown_dtype": ("single", entry(NORM_B, dtype="Q4"), ["model.safetensors", NORM_B, "dtype 'Q4'"]),
    "dtype_not_a_string": ("single", entry(NORM_B, dtype=5), [NORM_B, "dtype 5"]),
    "integer_dtype": ("single", entry(NORM_B, dtype="I32"), ["model.safetensors", NORM_B, "dtype I32"]),
    "shape_a_string": ("single", entry(NORM_B, shape="64"), [NORM_B, "shape '64'"]),
    "shape_of_bools": ("single", entry(NORM_B, shape=[True]), [NORM_B, "shape [True]"]),
    "shape_negative": ("single", entry(NORM_B, shape=[-64]), [NORM_B, "shape [-64]"]),
    "shape_floats": ("single", entry(NORM_B, shape=[64.0]), [NORM_B, "shape [64.0]"]),
    "offsets_missing": ("single", header_edit(lambda h: h[NORM_B].pop("data_offsets") and None),
                        [NORM_B, "data_offsets None"]),
    "offsets_strings": ("single", entry(NORM_B, data_offsets=["0", "256"]), [NORM_B, "data_offsets"]),
    "entry_not_an_object": ("single", header_edit(lambda h: h.update({NORM_B: [1, 2]})), [NORM_B, "not an object"]),
    "header_a_list": ("single", header_edit(lambda h: [h]), ["model.safetensors", "not a JSON object"]),
    "header_not_json": ("single", header_edit(lambda h: b"{not json"), ["model.safetensors", "Corrupt"]),
    "header_not_utf8": ("single", header_edit(lambda h: b'{"\xff\xfe": 1}'), ["model.safetensors", "Corrupt"]),
    "header_deeply_nested": ("single", header_edit(lambda h: NESTED), ["model.safetensors", "recursion"]),
    "header_key_twice": ("single", header_edit(lambda h: json.dumps(h).replace("{", f'{{"{NORM_A}": 0,', 1).encode()),
                         ["model.safetensors", "appears twice"]),
    "metadata_not_strings": ("single", header_edit(lambda h: h.update({"__metadata__": {"format": 1}})),
                             ["__metadata__"]),
    "header_length_past_end": ("single", raw_file(b"\xff" * 8 + b"{}"), ["model.safetensors", "past the end"]),
    "file_of_3_bytes": ("single", raw_file(b"abc"), ["model.safetensors", "3 bytes"]),
    # shard index and weight files
    "index_not_json": ("sharded", raw_file(b"{oops", INDEX), [INDEX, "not valid JSON"]),
    "index_a_list": ("sharded", raw_file(b"[]", INDEX), [INDEX, "not hold a JSON object"]),
    "weight_map_missing": ("sharded", index_edit(lambda i: {"metadata": {}}), [INDEX, "weight_map"]),
    "weight_map_a_list": ("sharded", index_edit(lambda i: {"weight_map": [SHARD_1]}), [INDEX, "weight_map"]),
    "weight_map_empty": ("sharded", index_edit(lambda i: {"weight_map": {}}), [INDEX, "weight_map"]),
    "weight_map_value_int": ("sharded", index_edit(lambda i: i["weight_map"].update({NORM_A: 7})), [INDEX, "7"]),
    "shard_/etc/passwd": ("sharded", outside_shard("/etc/passwd"), [INDEX, "/etc/passwd", "inside the model folder"]),
    "shard_../outside": ("sharded", outside_shard("../outside.safetensors"), [INDEX, "../outside.safetensors"]),
    "shard_in_subfolder": ("sharded", outside_shard("sub/model-1.safetensors"), [INDEX, "sub/model-1.safetensors"]),
    "shard_not_safetensors": ("sharded", outside_shard("model-1.bin"), [INDEX, "model-1.bin"]),
    "shard_not_listed": ("sharded", stray_shard, [INDEX, "model-extra.safetensors", "does not list"]),
    "tensor_in_two_shards": ("sharded", duplicate_in_second_shard, ["is in both", SHARD_1]),
    "stray_beside_model": ("single", stray_copy("model-copy.safetensors"), ["model-copy.safetensors", "stray"]),
    # config.json fields: type and range
    "layers_a_string": bad_field("num_hidden_layers", "2", "'2'"),
    "layers_a_bool": bad_field("num_hidden_layers", True),
    "layers_zero": bad_field("num_hidden_layers", 0),
    "layers_more_than_the_file": bad_field("num_hidden_layers", 3, "num_hidden_layers is 3 but the weights hold"),
    "hidden_size_negative": bad_field("hidden_size", -64),
    "vocab_10^12": bad_field("vocab_size", 10**12),
    "vocab_a_float": bad_field("vocab_size", 300.0),
    "vocab_unlike_the_file": ("single", config_edit(vocab_size=10**9),
                              ["model.embed_tokens.weight", "(1000000000, 64)"]),
    "intermediate_null_required": bad_field("intermediate_size", None),
    "eos_a_string": bad_field("eos_token_id", "</s>", "'</s>'"),
    "eos_list_with_string": bad_field("eos_token_id", [256, "x"]),
    "eos_negative": bad_field("eos_token_id", -1),
    "eos_outside_vocab": bad_field("eos_token_id", 300, "[0, 300)"),
    "generation_eos_a_string": ("single", config_edit("generation_config.json", eos_token_id="x"),
                                ["generation_config.json", "eos_token_id"]),
    "generation_config_not_json": ("single", raw_file(b"{", "generation_config.json"), ["generation_config.json"]),
    "rope_theta_zero": bad_field("rope_theta", 0),
    "rope_theta_negative": bad_field("rope_theta", -1.0),
    "rope_theta_a_string": bad_field("rope_theta", "1e4"),
    "rope_theta_nan": bad_field("rope_theta", float("nan"), "nan"),
    "rope_scaling_a_string": bad_field("rope_scaling", "yarn"),
    "rms_norm_eps_negative": bad_field("rms_norm_eps", -1e-6),
    "max_positions_zero": bad_field("max_position_embeddings", 0),
    "max_positions_negative": bad_field("max_position_embeddings", -5),
    "block_size_a_string": bad_field("block_size", "8"),
    "block_size_a_bool": bad_field("block_size", True),
    "block_size_a_float": bad_field("block_size", 2.5),
    "mask_token_a_string": bad_field("mask_token_id", "259"),
    "mask_token_outside_vocab": bad_field("mask_token_id", -1, "mask_token_id -1 is outside"),
    "tie_embeddings_a_string": bad_field("tie_word_embeddings", "false"),
    "heads_not_a_multiple": bad_field("num_key_value_heads", 3),
    "head_dim_odd": bad_field("head_dim", 15),
    "config_a_list": ("single", raw_file(b"[1]", "config.json"), ["config.json", "not hold a JSON object"]),
    "config_deeply_nested": ("single", raw_file(NESTED, "config.json"), ["config.json", "not valid JSON"]),
    # weights that would run, wrongly
    "nan_weight": ("single", weights_edit(lambda w: w[UP].__setitem__((3, 5), np.nan)), ["NaN or infinite", UP]),
    "inf_weight": ("single", weights_edit(lambda w: w[NORM_A].__setitem__(0, np.inf)), ["NaN or infinite", NORM_A]),
    # tokenizer files (loaded by `load` and checked by the converter)
    "tokenizer_json_broken": ("single", raw_file(b'{"model": 5}', "tokenizer.json"), ["tokenizer"]),
    "tokenizer_config_not_json": ("single", raw_file(b"{", "tokenizer_config.json"), ["tokenizer_config.json"]),
}
TOKENIZER_CASES = {"tokenizer_json_broken", "tokenizer_config_not_json"}


def torch_load(path: Path, out: Path) -> None:
    pytest.importorskip("torch")
    from orthrus_mlx.torch_backend.loader import load_model as torch_load_model

    torch_load_model(path, device="cpu")


TOOLS = {
    "mlx": lambda path, out: load(path),
    "torch": torch_load,
    "convert": lambda path, out: convert(path, out, progress=False),
}


@pytest.mark.parametrize("tool", sorted(TOOLS))
@pytest.mark.parametrize("case", sorted(CASES))
def test_corrupt_checkpoint_gets_one_line_naming_file_and_field(sources, tmp_path, case, tool):
    if tool == "torch" and case in TOKENIZER_CASES:
        pytest.skip("the PyTorch load_model reads no tokenizer")
    base, corrupt, named = CASES[case]
    folder = Path(shutil.copytree(sources[base], tmp_path / "ck"))
    corrupt(folder)
    out = tmp_path / "out"
    with pytest.raises((ValueError, OSError)) as caught:
        TOOLS[tool](folder, out)
    message = str(caught.value)
    assert "\n" not in message and len(message) < 600, message
    for part in named:
        assert part in message, (part, message)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_an_outside_name_is_refused_without_looking_at_it(sources, tmp_path):
    """The same words whether the outside file exists or not: the error reveals nothing."""
    (tmp_path / "exists.safetensors").write_bytes(b"secret")
    messages = []
    for name in [str(tmp_path / "exists.safetensors"), str(tmp_path / "absent.safetensors"),
                 "../exists.safetensors", "../absent.safetensors"]:
        folder = Path(shutil.copytree(sources["sharded"], tmp_path / "ck"))
        index_edit(lambda i: i["weight_map"].update({NORM_A: name}))(folder)
        with pytest.raises(ValueError) as caught:
            load(folder)
        messages.append(str(caught.value).replace(name, "NAME"))
        shutil.rmtree(folder)
    assert len(set(messages)) == 1 and "NAME" in messages[0], messages


def test_huge_layer_count_is_refused_before_any_model_is_built(sources, tmp_path, monkeypatch):
    folder = Path(shutil.copytree(sources["single"], tmp_path / "ck"))
    config_edit(num_hidden_layers=10_000_000)(folder)

    def no_model(*args):
        raise AssertionError("a model was built before the config was checked against the weights")

    classes = loader.model_classes
    monkeypatch.setattr(loader, "model_classes", lambda config: (no_model, classes(config)[1]))
    start = time.perf_counter()
    with pytest.raises(ValueError, match=r"num_hidden_layers is 10000000 but the weights hold layers 0\.\.1"):
        load_model(folder)
    assert time.perf_counter() - start < 2
    pytest.importorskip("torch")
    from orthrus_mlx.torch_backend import loader as torch_loader

    monkeypatch.setattr(torch_loader, "Model", no_model)
    with pytest.raises(ValueError, match="num_hidden_layers is 10000000"):
        torch_loader.load_model(folder, device="cpu")


def test_float16_cast_that_overflows_is_refused_by_name(tmp_path):
    weights = random_weights(tiny_config(), seed=2)
    weights[UP][0, 0] = 1e6  # fine in float32, inf in float16
    folder = save_checkpoint(tmp_path / "ck", tiny_config(), weights)
    assert load_model(folder)[0] is not None
    with pytest.raises(ValueError, match=rf"NaN or infinite values \(as float16\) in 1 tensor\(s\): \['{UP}'\]"):
        load_model(folder, dtype="float16")
    with pytest.raises(ValueError, match=rf"NaN or infinite values \(as float16\) in 1 tensor\(s\): \['{UP}'\]"):
        convert(folder, tmp_path / "out", dtype="float16", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_finite_weights_whose_float16_sum_overflows_still_load(tmp_path):
    """The cheap test sums each tensor; a sum past 65504 is re-tested exactly, not refused."""
    import mlx.core as mx

    weights = random_weights(tiny_config(), seed=2)
    weights["model.embed_tokens.weight"][:] = 100.0
    big = mx.array(weights["model.embed_tokens.weight"]).astype(mx.float16)
    assert mx.isinf(big.sum(axis=-1).sum()).item()  # the cheap test alone would refuse it
    folder = save_checkpoint(tmp_path / "ck", tiny_config(), weights, dtype="float16", tokenizer=False)
    model, _ = load_model(folder)
    assert mx.array_equal(model.model.embed_tokens.weight, big)


# convert --force and the output path


def folder_with(path: Path, files: Dict[str, str], folders=()) -> Path:
    path.mkdir()
    for name, text in files.items():
        (path / name).write_text(text)
    for name in folders:
        (path / name).mkdir()
    return path


NOT_MODELS = {
    "thesis": ({"thesis.txt": "years of work"}, ["photos"], "holds photos, which is not a file"),
    "model_and_notes": ({"config.json": "{}", "model.safetensors": "", "notes.txt": "mine"}, [],
                        "holds notes.txt, which is not a model file"),
    "model_and_subfolder": ({"config.json": "{}", "model.safetensors": ""}, ["runs"], "holds runs"),
    "config_only": ({"config.json": "{}", "tokenizer.json": "{}"}, [], "has no *.safetensors"),
    "weights_only": ({"model.safetensors": ""}, [], "has no config.json"),
}


@pytest.mark.parametrize("case", sorted(NOT_MODELS))
def test_force_refuses_a_folder_that_is_not_a_model(sources, tmp_path, case):
    files, folders, reason = NOT_MODELS[case]
    target = folder_with(tmp_path / "out", files, folders)
    before = sorted(p.name for p in target.iterdir())
    with pytest.raises(FileExistsError) as caught:
        convert(sources["single"], target, force=True, progress=False)
    assert "--force replaces only a model folder" in str(caught.value) and reason in str(caught.value)
    assert sorted(p.name for p in target.iterdir()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_force_replaces_a_hugging_face_model_folder_and_our_own(sources, tmp_path):
    target = shutil.copytree(sources["sharded"], tmp_path / "out")
    (target / "README.md").write_text("model card")
    convert(sources["single"], target, force=True, progress=False)
    assert not (target / "README.md").exists() and (target / INDEX).is_file()
    convert(sources["single"], target, dtype="bfloat16", force=True, progress=False)
    assert json.loads((target / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_output_path_that_is_the_cwd_or_holds_it_or_the_source_is_refused(sources, tmp_path, monkeypatch):
    work = folder_with(tmp_path / "work", {"thesis.txt": "mine"})
    (work / "sub").mkdir()
    monkeypatch.chdir(work / "sub")
    for path in [".", "..", str(work)]:
        with pytest.raises(ValueError, match="is the current folder or holds it"):
            convert(sources["single"], path, force=True, progress=False)
    source = shutil.copytree(sources["single"], tmp_path / "models" / "src")
    for path in [source, source / "inside", tmp_path / "models"]:
        with pytest.raises(ValueError, match="overlaps the source checkpoint"):
            convert(source, path, force=True, progress=False)
    (tmp_path / "link").symlink_to(work)
    with pytest.raises(FileExistsError, match="is a symbolic link"):
        convert(source, tmp_path / "link", force=True, progress=False)
    assert (work / "thesis.txt").read_text() == "mine"
    assert sorted(p.name for p in work.iterdir()) == ["sub", "thesis.txt"]
    assert (source / "model.safetensors").is_file()


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_staging_folders_of_killed_runs_are_removed_and_no_others(sources, tmp_path):
    dead = dead_pid()
    stale = [f".out.convert-{dead}-abcdefgh.partial", f".out.convert-{dead}-a1b2c3d_.old"]
    kept = [
        ".out.convert-1-abcdefgh.partial",  # pid 1 is running: a live conversion
        f".out.convert-{dead}-toolong99.partial",  # not a name we make
        f".other.convert-{dead}-abcdefgh.partial",  # another target's
        ".out.partial",
    ]
    convert(sources["single"], tmp_path / "out", progress=False)
    for name in stale + kept:
        folder_with(tmp_path / name, {"model.safetensors": "partial data"})
    convert(sources["single"], tmp_path / "out", force=True, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept + ["out"])


def test_replaced_folder_comes_back_when_a_kill_fell_between_the_renames(tmp_path):
    old = folder_with(tmp_path / f".out.convert-{dead_pid()}-abcdefgh.old", {"config.json": "{}"})
    remove_stale_staging(tmp_path / "out")
    assert not old.exists() and (tmp_path / "out" / "config.json").read_text() == "{}"


KILLED_RUN = """
import os, signal, sys
from orthrus_convert import convert
from orthrus_convert.writer import ShardedWriter
write = ShardedWriter.write
def write_then_die(self, name, parts):
    write(self, name, parts)
    os.kill(os.getpid(), signal.SIGKILL)
ShardedWriter.write = write_then_die
convert(sys.argv[1], sys.argv[2], progress=False)
"""


def test_next_run_cleans_up_after_a_kill_9(sources, tmp_path):
    target = tmp_path / "out"
    run = subprocess.run([sys.executable, "-c", KILLED_RUN, str(sources["single"]), str(target)],
                         env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)), timeout=120)
    assert run.returncode == -9
    left = [p.name for p in tmp_path.iterdir()]
    assert len(left) == 1 and left[0].startswith(".out.convert-") and left[0].endswith(".partial")
    convert(sources["single"], target, progress=False)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert load_model(target)[0] is not None
