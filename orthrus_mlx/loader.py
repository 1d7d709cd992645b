"""Load an Orthrus (or plain Qwen3) checkpoint from a folder or a Hugging Face repo id."""

from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map
from mlx_lm.utils import load_model as mlx_lm_load_model
from mlx_lm.utils import load_tokenizer

from .core.checkpoint import (  # noqa: F401  (re-exported: the loader's public helpers)
    HUB_FILES,
    check_diffusion_config,
    check_orthrus_fields,
    check_tensor_shapes,
    eos_list,
    read_config,
    read_safetensors_header,
    resolve_model_path,
    tensor_shapes,
    weight_files,
)
from .models.qwen3 import Model, ModelArgs

# The small trained checkpoint the repo ships: the default of every command.
DEFAULT_MODEL = Path(__file__).parent / "assets" / "orthrus-tiny"
DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


def check_tensors(args: ModelArgs, config: Dict[str, Any], files: List[Path]) -> None:
    """Name every missing, unexpected or misshapen tensor before loading any data."""
    given = tensor_shapes(files)
    check_diffusion_config(args, given)
    if "quantization" in config:
        return  # packed shapes: mlx-lm's strict load checks names and shapes
    expected = {k: list(v.shape) for k, v in tree_flatten(Model(args).parameters())}
    check_tensor_shapes(args, expected, given)


def model_args(config: Dict[str, Any]) -> ModelArgs:
    args = ModelArgs.from_dict(config)
    check_orthrus_fields(args)
    return args


def lay_out_for_cpu(model: Model) -> None:
    """Store every float32 matrix transposed, keeping its shape and values.

    A layer computes `x @ W.T`. On MLX's CPU backend that product, for the few
    rows of a decoding pass, is faster when `W.T` is the contiguous one: BLAS then
    packs no transposed operand (decoding steps 1.07-1.18x faster with OpenBLAS,
    1.25-1.97x with MLX's bundled BLAS). `W` becomes a transposed view of a
    contiguous `W.T`, so the model and its parameters read exactly as before.
    """
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Embedding)) and module.weight.dtype == mx.float32:
            module.weight = mx.contiguous(module.weight.T).T


def load_model(
    path_or_repo: Union[str, Path],
    dtype: Optional[str] = None,
    revision: Optional[str] = None,
    lazy: bool = False,
) -> Tuple[Model, Dict[str, Any]]:
    """The model alone (no tokenizer), in the checkpoint's dtype unless `dtype` is given."""
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    model_path = resolve_model_path(path_or_repo, revision)
    config = read_config(model_path)
    args = model_args(config)
    check_tensors(args, config, weight_files(model_path))
    model, config = mlx_lm_load_model(
        model_path,
        lazy=True,
        model_config={"eos_token_id": config["eos_token_id"]},
        get_model_classes=lambda config: (Model, ModelArgs),
    )
    if dtype is not None:
        cast = lambda p: p.astype(DTYPES[dtype]) if mx.issubdtype(p.dtype, mx.floating) else p
        model.update(tree_map(cast, model.parameters()))
    if mx.default_device() == mx.cpu:
        lay_out_for_cpu(model)
    if not lazy:
        mx.eval(model.parameters())
    return model, config


def load(
    path_or_repo: Union[str, Path],
    dtype: Optional[str] = None,
    revision: Optional[str] = None,
    lazy: bool = False,
    tokenizer_config: Optional[Dict[str, Any]] = None,
    return_config: bool = False,
):
    """(model, tokenizer) from a local folder or a Hugging Face repo id, like `mlx_lm.load`."""
    model_path = resolve_model_path(path_or_repo, revision)
    model, config = load_model(model_path, dtype=dtype, lazy=lazy)
    tokenizer = load_tokenizer(
        model_path, tokenizer_config, eos_token_ids=config["eos_token_id"]
    )
    return (model, tokenizer, config) if return_config else (model, tokenizer)


load_model_and_tokenizer = load
