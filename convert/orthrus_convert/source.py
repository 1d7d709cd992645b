"""Open a Hugging Face Orthrus checkpoint (Qwen3 or Llama) and check it, reading headers only.

Every check here runs before the converter writes a byte, so a bad input never
leaves anything behind.
"""

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from orthrus_mlx.core.checkpoint import (
    DTYPE_SIZES,
    TensorInfo,
    checkpoint_tensors,
    read_config,
    read_json_object,
    resolve_model_path,
    weight_files,
)
from orthrus_mlx.loader import check_tensors, checked_tokenizer, model_args
from orthrus_mlx.models import architecture, model_classes

# numpy has no bfloat16: its bits are read as little-endian uint16.
NUMPY_DTYPES = {"F32": "<f4", "F16": "<f2", "BF16": "<u2"}
# Tensors that are dropped on the way, as Model.sanitize does when loading.
DROPPED = ("rotary_emb.inv_freq",)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


def read_rows(tensor: TensorInfo, start: int, stop: int) -> mx.array:
    """Rows [start, stop) read straight from the file: memory for those rows only."""
    row = DTYPE_SIZES[tensor.dtype]
    for s in tensor.shape[1:]:
        row *= s
    with open(tensor.file, "rb") as f:
        f.seek(tensor.offset + start * row)
        data = f.read((stop - start) * row)
    if len(data) != (stop - start) * row:
        raise ValueError(f"Tensor {tensor.name} in {tensor.file} is cut short: truncated file?")
    array = mx.array(np.frombuffer(data, dtype=NUMPY_DTYPES[tensor.dtype]))
    if tensor.dtype == "BF16":
        array = array.view(mx.bfloat16)
    return array.reshape(stop - start, *tensor.shape[1:]) if tensor.shape else array.reshape(())


@dataclass
class Source:
    path: Path
    config: Dict[str, Any]  # config.json as written, not merged with generation_config
    args: Any  # the architecture's ModelArgs
    tensors: List[TensorInfo]  # grouped by file, in file order: read front to back
    # Module path -> module, for the modules that mlx-lm could quantize (Linear, Embedding).
    quantizable: Dict[str, nn.Module]


def read_raw_config(path: Path) -> Dict[str, Any]:
    """config.json as written, after the loader's checks of every field (generation_config.json's too)."""
    read_config(path)
    return read_json_object(path / "config.json")


def check_source_config(path: Path, config: Dict[str, Any]) -> Any:
    try:
        architecture(config.get("model_type"))
    except ValueError as e:
        raise ValueError(f"{path} is not an Orthrus checkpoint we can convert: {e}") from e
    if "quantization" in config or "quantization_config" in config:
        raise ValueError(
            f"{path} is already quantized (config.json has a quantization entry); "
            "convert from the original Hugging Face checkpoint"
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a plain Qwen3 converts fine, AR mode only
        return model_args(config, config_file=path / "config.json")


def check_tokenizer(path: Path) -> None:
    """The tokenizer files are copied as they are: they must load, as the loader will load them."""
    if any((path / name).is_file() for name in TOKENIZER_FILES):
        checked_tokenizer(path)
    else:
        warnings.warn(
            f"No tokenizer files in {path}: the output loads with orthrus_mlx.load_model "
            "but not with orthrus_mlx.load",
            stacklevel=4,
        )


def open_source(path_or_repo: Union[str, Path], revision: Optional[str] = None) -> Source:
    """Config, tensor list and the model's quantizable modules; raises on anything off."""
    path = resolve_model_path(path_or_repo, revision)
    config = read_raw_config(path)
    args = check_source_config(path, config)
    files = weight_files(path)
    tensors = checkpoint_tensors(files)  # offsets, sizes, overlaps, duplicates: checked
    check_tensors(args, config, files)  # dtypes, layer count, missing, unexpected, misshapen: named
    check_tokenizer(path)
    keep = [t for t in tensors.values() if not any(d in t.name for d in DROPPED)]
    if args.tie_word_embeddings:
        keep = [t for t in keep if t.name != "lm_head.weight"]
    # Built lazily: its random initial weights are never evaluated.
    model = model_classes(config)[0](args)
    quantizable = {p: m for p, m in model.named_modules() if hasattr(m, "to_quantized")}
    return Source(path, config, args, keep, quantizable)
