"""Open a Hugging Face Orthrus/Qwen3 checkpoint and check it, reading headers only.

Every check here runs before the converter writes a byte, so a bad input never
leaves anything behind.
"""

import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from orthrus_mlx.core.checkpoint import read_safetensors_header, resolve_model_path, weight_files
from orthrus_mlx.loader import check_tensors, model_args
from orthrus_mlx.models import architecture, model_classes

# safetensors dtype -> bytes per element; the only dtypes a float checkpoint may hold.
FLOAT_DTYPES = {"F32": 4, "F16": 2, "BF16": 2}
# numpy has no bfloat16: its bits are read as little-endian uint16.
NUMPY_DTYPES = {"F32": "<f4", "F16": "<f2", "BF16": "<u2"}
# Tensors that are dropped on the way, as Model.sanitize does when loading.
DROPPED = ("rotary_emb.inv_freq",)


@dataclass(frozen=True)
class SourceTensor:
    name: str
    file: Path
    dtype: str  # safetensors dtype string: F32, F16, BF16
    shape: Tuple[int, ...]
    offset: int  # where its data starts in the file

    def read_rows(self, start: int, stop: int) -> mx.array:
        """Rows [start, stop) read straight from the file: memory for those rows only."""
        row = FLOAT_DTYPES[self.dtype]
        for s in self.shape[1:]:
            row *= s
        with open(self.file, "rb") as f:
            f.seek(self.offset + start * row)
            data = f.read((stop - start) * row)
        if len(data) != (stop - start) * row:
            raise ValueError(f"Tensor {self.name} in {self.file} is cut short: truncated file?")
        array = mx.array(np.frombuffer(data, dtype=NUMPY_DTYPES[self.dtype]))
        if self.dtype == "BF16":
            array = array.view(mx.bfloat16)
        return array.reshape(stop - start, *self.shape[1:]) if self.shape else array.reshape(())


@dataclass
class Source:
    path: Path
    config: Dict[str, Any]  # config.json as written, not merged with generation_config
    args: Any  # the architecture's ModelArgs
    tensors: List[SourceTensor]  # grouped by file, in file order: read front to back
    # Module path -> module, for the modules that mlx-lm could quantize (Linear, Embedding).
    quantizable: Dict[str, nn.Module]


def read_raw_config(path: Path) -> Dict[str, Any]:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"No config.json in {path}: not a Hugging Face checkpoint folder")
    try:
        with open(config_file) as f:
            config = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{config_file} is not valid JSON: {e}") from e
    if not isinstance(config, dict):
        raise ValueError(f"{config_file} does not hold a JSON object")
    return config


def check_config(path: Path, config: Dict[str, Any]) -> Any:
    try:
        architecture(config.get("model_type"))
    except ValueError as e:
        raise ValueError(f"{path} is not an Orthrus checkpoint we can convert: {e}") from e
    if "quantization" in config or "quantization_config" in config:
        raise ValueError(
            f"{path} is already quantized (config.json has a quantization entry); "
            "convert from the original Hugging Face checkpoint"
        )
    try:
        model_classes(config)[1].from_dict(config)
    except TypeError as e:  # a required field of the architecture is missing
        raise ValueError(f"{path}/config.json lacks {config['model_type']} fields: {e}") from e
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a plain Qwen3 converts fine, AR mode only
        return model_args(config)


def read_tensors(files: List[Path]) -> List[SourceTensor]:
    """Headers of every shard, checked against the shard's size; names unique across shards."""
    tensors, seen = [], {}
    for file in files:
        header = read_safetensors_header(file)
        with open(file, "rb") as f:
            header_bytes = int.from_bytes(f.read(8), "little")
        data_size = os.path.getsize(file) - 8 - header_bytes
        entries = []
        for name, info in header.items():
            try:
                dtype, shape = info["dtype"], tuple(int(s) for s in info["shape"])
                begin, end = (int(o) for o in info["data_offsets"])
            except (KeyError, TypeError, ValueError) as e:
                raise ValueError(f"Corrupt safetensors header in {file}: bad entry for {name}") from e
            if dtype not in FLOAT_DTYPES:
                raise ValueError(
                    f"Tensor {name} in {file} has dtype {dtype}; expected one of "
                    f"{sorted(FLOAT_DTYPES)} (an unquantized Hugging Face checkpoint)"
                )
            count = 1
            for s in shape:
                count *= s
            if end - begin != count * FLOAT_DTYPES[dtype] or begin < 0:
                raise ValueError(
                    f"Corrupt safetensors header in {file}: tensor {name} has shape "
                    f"{shape} ({dtype}) but occupies bytes [{begin}, {end})"
                )
            if end > data_size:
                raise ValueError(
                    f"Tensor {name} in {file} runs past the end of the file "
                    f"({end} > {data_size} data bytes): truncated download?"
                )
            if name in seen:
                raise ValueError(f"Tensor {name} is in both {seen[name]} and {file}")
            seen[name] = file
            entries.append((begin, SourceTensor(name, file, dtype, shape, 8 + header_bytes + begin)))
        tensors += [t for _, t in sorted(entries, key=lambda e: e[0])]
    return tensors


def open_source(path_or_repo: Union[str, Path], revision: Optional[str] = None) -> Source:
    """Config, tensor list and the model's quantizable modules; raises on anything off."""
    path = resolve_model_path(path_or_repo, revision)
    config = read_raw_config(path)
    args = check_config(path, config)
    files = weight_files(path)
    tensors = read_tensors(files)
    check_tensors(args, config, files)  # missing, unexpected, misshapen: named
    keep = [t for t in tensors if not any(d in t.name for d in DROPPED)]
    if args.tie_word_embeddings:
        keep = [t for t in keep if t.name != "lm_head.weight"]
    # Built lazily: its random initial weights are never evaluated.
    model = model_classes(config)[0](args)
    quantizable = {p: m for p, m in model.named_modules() if hasattr(m, "to_quantized")}
    return Source(path, config, args, keep, quantizable)
