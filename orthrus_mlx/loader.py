"""Load a model and its tokenizer: a Hugging Face or MLX folder, a Hub repo id, or a GGUF file;
optionally with a drafter adapter (drafter.py) giving the base its diffusion view."""

import math
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map
from mlx_lm.tokenizer_utils import BPEStreamingDetokenizer, TokenizerWrapper
from mlx_lm.utils import dequantize_model, load_tokenizer
from mlx_lm.utils import load_model as mlx_lm_load_model

from . import distributed, gguf
from .adapters import load_adapters
from .core.checkpoint import (
    check_against_config,
    check_finite,
    check_float_tensors,
    check_orthrus_fields,
    check_tensor_shapes,
    checkpoint_tensors,
    read_config,
    read_json_object,
    resolve_model_path,
    shapes_of,
    weight_files,
)
from .core.config_checks import check_required
from .core.dtypes import DTYPE_NAMES, check_dtype
from .drafter import attach_drafter, is_adapter
from .models import model_classes
from .models.diffusion import DiffusionModel as Model
from .named import NAMED_MODELS, default_dtype, resolve_named

# The small trained checkpoint the repo ships: the default of every command.
DEFAULT_MODEL = Path(__file__).parent / "assets" / "orthrus-tiny"
DTYPES = {name: getattr(mx, name) for name in DTYPE_NAMES}
TOKENIZER_SETTINGS = ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")
MakeTokenizer = Callable[[Optional[Dict[str, Any]]], TokenizerWrapper]


def locate(
    path_or_repo: Union[str, Path], drafter: Union[str, Path, None] = None, revision: Optional[str] = None
) -> Tuple[Path, Optional[Path]]:
    """The base (a folder or a GGUF file) and the drafter adapter's folder, on disk.

    The one place where what the user named becomes files: fetched from the Hub if need be.
    """
    if str(path_or_repo) in NAMED_MODELS:
        base, shipped = resolve_named(str(path_or_repo), drafter is not None)
        return base, resolve_model_path(drafter) if drafter is not None else shipped
    path = Path(path_or_repo).expanduser()
    base = path if gguf.is_gguf(path) else resolve_model_path(path_or_repo, revision)
    return base, None if drafter is None else resolve_model_path(drafter)


def model_args(config: Dict[str, Any], drafter: bool = False, config_file: Union[str, Path] = "config.json"):
    """The architecture's ModelArgs; warns for a plain base unless a drafter will complete it.

    `config` was checked field by field (read_config); here the architecture's required fields."""
    args_class = model_classes(config)[1]
    check_required(config, args_class, config_file, config.get("model_type"))
    args = args_class.from_dict(config)
    if args.has_diffusion or not drafter:
        check_orthrus_fields(args)
    return args


def check_tensors(args: Any, config: Dict[str, Any], files: List[Path]) -> None:
    """Name every missing, unexpected or misshapen tensor before loading any data.

    The layer count is compared with the headers before the model is built for the expected
    shapes, so a config can never make us build more than the file holds.
    """
    tensors = checkpoint_tensors(files)
    given = shapes_of(tensors)
    check_against_config(args, given, files[0].parent)
    if "quantization" in config:
        return  # packed shapes: mlx-lm's strict load checks names and shapes
    check_float_tensors(tensors.values())
    expected = {k: list(v.shape) for k, v in tree_flatten(model_classes(config)[0](args).parameters())}
    check_tensor_shapes(args, expected, given)


def load_folder(model_path: Path, drafter: bool) -> Tuple[Model, Dict[str, Any], MakeTokenizer]:
    """A Hugging Face or MLX folder, through mlx-lm's loader (its quantization formats too)."""
    config = read_config(model_path)
    if is_adapter(config):
        raise ValueError(f"{model_path} is a drafter adapter, not a model: load a base with drafter={model_path}")
    args = model_args(config, drafter, model_path / "config.json")
    check_tensors(args, config, weight_files(model_path))
    model, config = mlx_lm_load_model(
        model_path,
        lazy=True,
        model_config={"eos_token_id": config["eos_token_id"]},
        get_model_classes=model_classes,
    )
    eos = config["eos_token_id"]
    return model, config, lambda extra: checked_tokenizer(model_path, extra, eos_token_ids=eos)


def checked_tokenizer(model_path: Path, tokenizer_config: Optional[Dict[str, Any]] = None, eos_token_ids=None):
    """mlx-lm's tokenizer; broken tokenizer files give one line naming the folder, not a traceback."""
    for name in TOKENIZER_SETTINGS:  # small JSON files: checked first, to name the broken one
        if (model_path / name).is_file():
            read_json_object(model_path / name)
    try:
        return load_tokenizer(model_path, tokenizer_config, eos_token_ids=eos_token_ids)
    except Exception as e:  # transformers and tokenizers raise many kinds, some not ValueError
        message = " ".join(str(e).split())[:300]
        raise ValueError(f"Could not load the tokenizer in {model_path}: {type(e).__name__}: {message}") from e


def load_gguf(path: Path, drafter: bool) -> Tuple[Model, Dict[str, Any], MakeTokenizer]:
    """A GGUF file: quantized matrices stay quantized, as the file has them (no llama.cpp)."""
    config, weights, meta = gguf.read_gguf(path)
    model_class, _ = model_classes(config)
    model = model_class(model_args(config, drafter))
    gguf.load_into(model, config, weights)

    def tokenizer(extra: Optional[Dict[str, Any]]) -> TokenizerWrapper:
        extra = dict(extra or {})
        template = extra.pop("chat_template", None)  # the one setting a GGUF tokenizer takes
        if extra:
            warnings.warn("tokenizer_config is ignored for a GGUF file: its tokenizer is its metadata's")
        hf = gguf.build_tokenizer(meta)
        if template is not None:
            hf.chat_template = template
        return TokenizerWrapper(hf, BPEStreamingDetokenizer, config["eos_token_id"])

    return model, config, tokenizer


def set_dtype(model: Model, config: Dict[str, Any], dtype: str) -> None:
    """Every weight in `dtype`; quantized layers are dequantized (on MLX's CPU backend the
    quantized kernels are slow for the multi-token passes of drafting and verifying).

    Scales and biases go to float32 before dequantizing, so the values are exactly those the
    quantized matmul computes with, before the one rounding to `dtype`."""

    def cast(to):
        return lambda p: p.astype(to) if mx.issubdtype(p.dtype, mx.floating) else p

    if any(isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)) for m in model.modules()):
        model.update(tree_map(cast(mx.float32), model.parameters()))
        dequantize_model(model)
        config.pop("quantization", None)
        config.pop("quantization_config", None)
    model.update(tree_map(cast(DTYPES[dtype]), model.parameters()))


def check_weights_finite(model: Model, where: Path, dtype: Optional[str] = None) -> None:
    """Every float parameter is free of NaN and inf.

    A NaN or inf makes a tensor's sum NaN or inf, and a sum is the cheapest reduction: row sums
    first, then their sum, measured 3-7x faster than `isfinite(v).all()` on MLX's CPU backend,
    with one host sync in all. A sum that is not finite may only have overflowed (float16):
    those tensors get the exact test.
    """
    floats = [(k, v) for k, v in tree_flatten(model.parameters()) if mx.issubdtype(v.dtype, mx.floating)]
    sums = mx.stack([v.sum(axis=-1).sum() for _, v in floats]).tolist()
    suspects = [(k, v) for (k, v), total in zip(floats, sums) if not math.isfinite(total)]
    check_finite(where, {k: mx.isfinite(v).all().item() for k, v in suspects}, dtype)


def load_all(
    path_or_repo: Union[str, Path],
    dtype: Optional[str] = None,
    revision: Optional[str] = None,
    lazy: bool = False,
    drafter: Union[str, Path, None] = None,
    group: Optional[distributed.Group] = None,
    adapter_path: Union[str, Path, None] = None,
) -> Tuple[Model, Dict[str, Any], MakeTokenizer]:
    """Model, config and a tokenizer maker: what `load` and `load_model` share.

    Over a `group` of more than one rank (by default the one `mlx.launch` started), each rank
    keeps only its shard: weights are read lazily and sliced before anything is evaluated."""
    check_dtype(dtype)
    base_path, drafter_path = locate(path_or_repo, drafter, revision)
    dtype = default_dtype(str(path_or_repo), dtype)
    load_base = load_gguf if gguf.is_gguf(base_path) else load_folder
    model, config, make_tokenizer = load_base(base_path, drafter_path is not None)
    if drafter_path is not None:
        attach_drafter(model, drafter_path)  # fingerprinted on the base as stored, before any cast
        config.update(block_size=model.block_size, mask_token_id=model.mask_token_id)
    if dtype is not None:
        set_dtype(model, config, dtype)
    group = group or distributed.world()
    if group.size() > 1:
        if adapter_path is not None:
            raise ValueError("LoRA adapters (adapter_path) are not supported on a model sharded over ranks")
        model.shard(group)
    if adapter_path is not None:
        load_adapters(model, adapter_path)
    if not lazy:
        mx.eval(model.parameters())
        check_weights_finite(model, base_path, dtype)
        if group.size() > 1:  # wait for the slowest rank's load here, not in a first pass
            mx.eval(mx.distributed.all_sum(mx.array(1.0), group=group, stream=mx.cpu))
    return model, config, make_tokenizer


def load_model(
    path_or_repo: Union[str, Path],
    dtype: Optional[str] = None,
    revision: Optional[str] = None,
    lazy: bool = False,
    drafter: Union[str, Path, None] = None,
    group: Optional[distributed.Group] = None,
    adapter_path: Union[str, Path, None] = None,
) -> Tuple[Model, Dict[str, Any]]:
    """The model alone (no tokenizer), in the checkpoint's dtype unless `dtype` is given.

    Unless `lazy`, the weights are read and checked for NaN and inf (as cast to `dtype`).
    """
    model, config, _ = load_all(path_or_repo, dtype, revision, lazy, drafter, group, adapter_path)
    return model, config


def load(
    path_or_repo: Union[str, Path],
    dtype: Optional[str] = None,
    revision: Optional[str] = None,
    lazy: bool = False,
    tokenizer_config: Optional[Dict[str, Any]] = None,
    return_config: bool = False,
    drafter: Union[str, Path, None] = None,
    group: Optional[distributed.Group] = None,
    adapter_path: Union[str, Path, None] = None,
):
    """(model, tokenizer), like `mlx_lm.load`, from a folder, a Hugging Face repo id or a GGUF file.

    `drafter`: an adapter folder (or repo id) whose diffusion view is applied to the base.
    `adapter_path`: an mlx-lm LoRA adapter folder applied to the base's AR view (`adapters.py`).
    `dtype`: cast every weight; a quantized base is dequantized to it.
    `group`: under `mlx.launch` (the default group has more than one rank), each rank loads
    only its shard of the heads and MLP (`Model.shard`); every rank must then run the same calls.
    """
    model, config, make_tokenizer = load_all(path_or_repo, dtype, revision, lazy, drafter, group, adapter_path)
    tokenizer = make_tokenizer(tokenizer_config)
    return (model, tokenizer, config) if return_config else (model, tokenizer)


load_model_and_tokenizer = load
