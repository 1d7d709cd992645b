"""The pure-python side of a Hugging Face checkpoint folder: config, EOS ids, shards, headers.

Shared by the MLX and PyTorch loaders and the converter, so it imports neither mlx nor torch.
Everything a folder says is checked here before any model is built or any data is read: a bad
folder gets one line naming the file and the field, never a traceback or wrong weights.
"""

import json
import re
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Tuple, Union

from .config_checks import check_config, check_token_ids, is_int, named, shown
from .step import eos_set

# The diffusion view's tensors in each layer's self_attn (docs/DESIGN.md section 1).
DIFFUSION_PARAMS = (
    "q_proj_diff",
    "k_proj_diff",
    "v_proj_diff",
    "o_proj_diff",
    "q_norm_diff",
    "k_norm_diff",
)
HUB_FILES = ["*.json", "*.safetensors", "*.jinja", "*.txt", "tokenizer.model", "README.md"]
INDEX_FILE = "model.safetensors.index.json"
# The weights are `model*.safetensors` (what mlx-lm loads); a shard index may name only those,
# as plain file names inside the folder.
SHARD_NAME = re.compile(r"model[^/\\\x00]*\.safetensors")
# safetensors dtype -> bytes per element.
DTYPE_SIZES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1,
    "U16": 2, "I16": 2, "F16": 2, "BF16": 2,
    "U32": 4, "I32": 4, "F32": 4,
    "U64": 8, "I64": 8, "F64": 8,
}
FLOAT_DTYPES = ("F32", "F16", "BF16")  # what an unquantized checkpoint may hold
MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit
LAYER_NAME = re.compile(r"model\.layers\.(\d+)\.")


def resolve_model_path(path_or_repo: Union[str, Path], revision: Optional[str] = None) -> Path:
    """A local folder as is; anything else is fetched from the Hugging Face Hub."""
    path = Path(path_or_repo).expanduser()
    if path.exists():
        if not path.is_dir():
            raise NotADirectoryError(f"Expected a model folder, got a file: {path}")
        return path
    repo = str(path_or_repo)
    if repo.startswith((".", "/", "~")) or repo.count("/") != 1:
        raise FileNotFoundError(f"No model folder at {path}")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo, revision=revision, allow_patterns=HUB_FILES))
    except Exception as e:  # the hub's own errors say little about what was asked for
        raise FileNotFoundError(
            f"No local folder {path} and could not fetch '{repo}' from the Hugging Face Hub: {e}"
        ) from e


def read_json_object(file: Path) -> Dict[str, Any]:
    """A JSON object from `file`; anything else is one line naming the file."""
    try:
        with open(file, "rb") as f:
            value = json.loads(f.read())
    except (ValueError, RecursionError) as e:  # bad JSON, bad UTF-8, absurd nesting
        raise ValueError(f"{file} is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{file} does not hold a JSON object")
    return value


def read_config(model_path: Path) -> Dict[str, Any]:
    """config.json, checked field by field, with the EOS ids of generation_config.json joined in."""
    config_file = model_path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"No config.json in {model_path}")
    config = read_json_object(config_file)
    check_config(config, config_file)
    eos = eos_set(config.get("eos_token_id"))
    generation_file = model_path / "generation_config.json"
    if generation_file.is_file():
        generation = read_json_object(generation_file)
        check_token_ids(generation, "eos_token_id", generation_file, config.get("vocab_size"))
        eos |= eos_set(generation.get("eos_token_id"))
    config["eos_token_id"] = sorted(eos)
    return config


def shard_names(index: Path) -> List[str]:
    """The shard files an index names, each a plain `model*.safetensors` name in its folder.

    A name is refused before anything is opened, so the error says nothing about files
    outside the folder.
    """
    weight_map = read_json_object(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"{index}: weight_map must be a non-empty object (tensor name -> shard file)")
    for tensor, name in weight_map.items():
        if not isinstance(name, str) or not SHARD_NAME.fullmatch(name):
            raise ValueError(
                f"{index}: weight_map puts {named(tensor)} in {named(name)}; a shard must be a "
                "file name model*.safetensors inside the model folder"
            )
    return sorted(set(weight_map.values()))


def weight_files(model_path: Path) -> List[Path]:
    """The safetensors files of the model: the index's shards, or the model*.safetensors files.

    Every model*.safetensors present must be one of them (mlx-lm loads them all), and
    model.safetensors, when there is no index, must be the only one.
    """
    present = sorted(p.name for p in model_path.glob("model*.safetensors"))
    index = model_path / INDEX_FILE
    if index.is_file():
        names = shard_names(index)
        stray = sorted(set(present) - set(names))
        if stray:
            raise ValueError(f"{model_path} holds {stray}, which {INDEX_FILE} does not list: remove it")
        missing = [str(model_path / n) for n in names if not (model_path / n).is_file()]
        if missing:
            raise FileNotFoundError(f"Shards listed in {index} are missing: {missing}")
        return [model_path / n for n in names]
    if not present:
        raise FileNotFoundError(f"No model*.safetensors in {model_path}")
    if "model.safetensors" in present and len(present) > 1:
        others = [n for n in present if n != "model.safetensors"]
        raise ValueError(
            f"{model_path} holds model.safetensors and also {others} with no {INDEX_FILE}: "
            "remove the stray file(s)"
        )
    return [model_path / n for n in present]


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a safetensors file, from its header: where its bytes are and what they hold."""

    name: str
    file: Path
    dtype: str  # safetensors dtype: F32, BF16, U32 ...
    shape: Tuple[int, ...]
    offset: int  # where its data starts in the file
    nbytes: int


def safetensors_tensors(path: Path) -> List[TensorInfo]:
    """Every tensor of a safetensors file, in file order, from its header alone.

    Checked against the file: each entry has a known dtype, a shape of integers >= 0 and data
    offsets inside the file whose span is exactly dtype size x elements, and no two tensors
    share bytes. Any failure is one line naming the file and the tensor.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise ValueError(f"Corrupt safetensors header in {path}: the file is {size} bytes long")
        (n,) = struct.unpack("<Q", prefix)
        if n > size - 8:
            raise ValueError(f"Corrupt safetensors header in {path}: header length {n} is past the end of the file")
        if n > MAX_HEADER_BYTES:
            raise ValueError(f"Corrupt safetensors header in {path}: header length {n} is over {MAX_HEADER_BYTES}")
        raw = f.read(n)
    try:
        header = json.loads(raw, object_pairs_hook=unique_keys)
    except (ValueError, RecursionError) as e:
        raise ValueError(f"Corrupt safetensors header in {path}: {e}") from None
    if not isinstance(header, dict):
        raise ValueError(f"Corrupt safetensors header in {path}: not a JSON object")
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (
        isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())
    ):
        raise ValueError(f"Corrupt safetensors header in {path}: __metadata__ must map names to strings")
    data_start, data_size = 8 + n, size - 8 - n
    tensors = [tensor_info(path, name, entry, data_start, data_size) for name, entry in header.items()]
    tensors.sort(key=lambda t: t.offset)
    last = None  # the tensor reaching furthest so far
    for t in tensors:
        if t.nbytes == 0:
            continue
        if last is not None and t.offset < last.offset + last.nbytes:
            raise ValueError(
                f"Corrupt safetensors header in {path}: tensors {named(last.name)} and {named(t.name)} "
                "share bytes"
            )
        if last is None or t.offset + t.nbytes > last.offset + last.nbytes:
            last = t
    return tensors


def unique_keys(pairs: List[Tuple[str, Any]]) -> Dict[str, Any]:
    """A JSON object that names a key twice is refused: readers differ on which one wins."""
    value = dict(pairs)
    if len(value) != len(pairs):
        seen = set()
        twice = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ValueError(f"{named(twice)} appears twice")
    return value


def tensor_info(path: Path, name: str, entry: Any, data_start: int, data_size: int) -> TensorInfo:
    def corrupt(what: str) -> ValueError:
        return ValueError(f"Corrupt safetensors header in {path}: tensor {named(name)} {what}")

    if not isinstance(entry, dict):
        raise corrupt(f"is described by {shown(entry)}, not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
        raise corrupt(f"has dtype {shown(dtype)}, not a safetensors dtype")
    if not isinstance(shape, list) or not all(is_int(s) and s >= 0 for s in shape):
        raise corrupt(f"has shape {shown(shape)}, not a list of integers >= 0")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(is_int(o) for o in offsets):
        raise corrupt(f"has data_offsets {shown(offsets)}, not two integers")
    begin, end = offsets
    nbytes = DTYPE_SIZES[dtype]
    for s in shape:
        nbytes *= s
    if not 0 <= begin <= end or end - begin != nbytes:
        raise corrupt(f"has shape {tuple(shape)} ({dtype}, {nbytes} bytes) but occupies bytes [{begin}, {end})")
    if end > data_size:
        raise ValueError(
            f"Tensor {named(name)} in {path} runs past the end of the file "
            f"({end} > {data_size} data bytes): truncated download?"
        )
    return TensorInfo(name, path, dtype, tuple(shape), data_start + begin, nbytes)


def read_safetensors_header(path: Path) -> Dict[str, Any]:
    """name -> {"dtype", "shape"} of a (checked) safetensors file, without its data."""
    return {t.name: {"dtype": t.dtype, "shape": list(t.shape)} for t in safetensors_tensors(path)}


def checkpoint_tensors(files: List[Path]) -> Dict[str, TensorInfo]:
    """Every tensor across the shards, each checked; a name in two shards is refused."""
    tensors: Dict[str, TensorInfo] = {}
    for f in files:
        for t in safetensors_tensors(f):
            if t.name in tensors:
                raise ValueError(f"Tensor {named(t.name)} is in both {tensors[t.name].file} and {f}")
            tensors[t.name] = t
    return tensors


def shapes_of(tensors: Dict[str, TensorInfo]) -> Dict[str, List[int]]:
    """Name -> shape, less the rotary tables some exporters save (never loaded)."""
    return {k: list(t.shape) for k, t in tensors.items() if "rotary_emb.inv_freq" not in k}


def tensor_shapes(files: List[Path]) -> Dict[str, List[int]]:
    """Every tensor's shape across the shards, from the (checked) headers alone."""
    return shapes_of(checkpoint_tensors(files))


def check_float_tensors(tensors: Iterable[TensorInfo]) -> None:
    """An unquantized checkpoint holds float tensors only: integers would load as garbage."""
    for t in tensors:
        if t.dtype not in FLOAT_DTYPES:
            raise ValueError(
                f"Tensor {named(t.name)} in {t.file} has dtype {t.dtype}; expected one of "
                f"{sorted(FLOAT_DTYPES)} (an unquantized checkpoint)"
            )


def is_diffusion_tensor(name: str) -> bool:
    parts = name.split(".")
    return len(parts) > 1 and parts[-2] in DIFFUSION_PARAMS


def check_orthrus_fields(args: Any) -> None:
    """Warn once for a plain base config; reject unusable block_size / mask_token_id (a drafter
    adapter's too: its config.json is not checked by check_config)."""
    if not args.has_diffusion:
        warnings.warn(
            "The config has no block_size/mask_token_id: this is a plain Qwen3/Llama "
            "model, running in AR mode without diffusion drafting (a drafter adapter adds it).",
            stacklevel=4,
        )
        return
    if not (is_int(args.block_size) and args.block_size >= 2):
        raise ValueError(f"block_size must be >= 2 (an integer), got {args.block_size!r}")
    if not (is_int(args.mask_token_id) and 0 <= args.mask_token_id < args.vocab_size):
        raise ValueError(f"mask_token_id {args.mask_token_id!r} is outside the vocabulary [0, {args.vocab_size})")


def check_diffusion_config(args: Any, names: Iterable[str]) -> None:
    if not args.has_diffusion and any(is_diffusion_tensor(k) for k in names):
        raise ValueError(
            "The checkpoint has diffusion tensors (*_proj_diff) but its config.json "
            "lacks block_size and/or mask_token_id."
        )


def check_layer_count(args: Any, names: Iterable[str], folder: Path) -> None:
    """num_hidden_layers against the layers the weights hold, before any model is built
    (a config asking for ten million layers would otherwise build them all first)."""
    layers = sorted({int(m.group(1)) for m in map(LAYER_NAME.match, names) if m})
    count = args.num_hidden_layers
    if len(layers) != count or (layers and layers[-1] != count - 1):  # i.e. layers != 0..count-1
        held = f"layers {layers[0]}..{layers[-1]} ({len(layers)} of them)" if layers else "no layers"
        raise ValueError(
            f"{folder / 'config.json'}: num_hidden_layers is {count} but the "
            f"weights hold {held}"
        )


def check_against_config(args: Any, given: Dict[str, List[int]], folder: Path) -> None:
    """What the headers say against what the config says, with no model built yet."""
    check_diffusion_config(args, given)
    check_layer_count(args, given, folder)


def check_tensor_shapes(args: Any, expected: Dict[str, List[int]], given: Dict[str, List[int]]) -> None:
    """Name every missing, unexpected or misshapen tensor before loading any data."""
    given = dict(given)
    if args.tie_word_embeddings:
        given.pop("lm_head.weight", None)
    if not args.has_diffusion:
        expected = {k: v for k, v in expected.items() if not is_diffusion_tensor(k)}
    missing = sorted(set(expected) - set(given))
    extra = sorted(set(given) - set(expected))
    if missing:
        raise ValueError(f"Missing tensors in the checkpoint: {missing[:10]}")
    if extra:
        raise ValueError(f"Unexpected tensors in the checkpoint: {extra[:10]}")
    for name, shape in given.items():
        if list(shape) != list(expected[name]):
            raise ValueError(
                f"Tensor {name} has shape {tuple(shape)}, expected {tuple(expected[name])} from config.json"
            )


def check_finite(where: Path, finite: Dict[str, bool], dtype: Optional[str] = None) -> None:
    """NaN or infinite weights give garbage text with no error: refuse them by name.

    `dtype`: the weights were cast to it (a float16 cast overflows past 65504).
    """
    bad = [name for name, ok in finite.items() if not ok]
    if bad:
        cast = f" (as {dtype})" if dtype else ""
        raise ValueError(f"{where}: NaN or infinite values{cast} in {len(bad)} tensor(s): {bad[:5]}")
