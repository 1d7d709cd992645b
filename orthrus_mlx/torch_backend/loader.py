"""Load an Orthrus (or plain Qwen3) checkpoint into the PyTorch model, straight from safetensors.

No `trust_remote_code` and no transformers model class: the tensors go by their checkpoint
names into `Model`. Defaults: bfloat16 on CUDA, float32 on CPU.
"""

from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import torch
from safetensors import safe_open

from ..core.checkpoint import (
    check_against_config,
    check_finite,
    check_float_tensors,
    check_orthrus_fields,
    check_tensor_shapes,
    checkpoint_tensors,
    read_config,
    resolve_model_path,
    shapes_of,
    weight_files,
)
from ..core.config_checks import check_required
from ..core.dtypes import DTYPE_NAMES, check_dtype
from .model import Model, ModelArgs

DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def model_args(config: Dict[str, Any], config_file: Union[str, Path] = "config.json") -> ModelArgs:
    if "quantization" in config:
        raise ValueError(
            "This is an MLX-quantized folder: the PyTorch backend loads the original "
            "Hugging Face checkpoint (bf16/fp32 safetensors)."
        )
    scaling = config.get("rope_scaling") or {}
    rope_type = scaling.get("rope_type", scaling.get("type"))
    rope_type = (config.get("rope_parameters") or {}).get("rope_type", rope_type)
    if rope_type not in (None, "default"):
        raise NotImplementedError(
            f"RoPE scaling {rope_type!r} is not implemented in the PyTorch backend (plain RoPE only)."
        )
    check_required(config, ModelArgs, config_file, "model", derived=("head_dim",))
    args = ModelArgs.from_dict(config)
    check_orthrus_fields(args)
    return args


def load_model(
    path_or_repo: Union[str, Path],
    device: Union[str, torch.device, None] = None,
    dtype: Optional[str] = None,
    revision: Optional[str] = None,
) -> Tuple[Model, Dict[str, Any]]:
    """(model, config) in eval mode on `device`; bfloat16 on CUDA and float32 on CPU unless `dtype`."""
    check_dtype(dtype)
    device = torch.device(device) if device is not None else default_device()
    torch_dtype = DTYPES[dtype] if dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    model_path = resolve_model_path(path_or_repo, revision)
    config = read_config(model_path)
    args = model_args(config, model_path / "config.json")
    files = weight_files(model_path)
    infos = checkpoint_tensors(files)
    given = shapes_of(infos)
    check_against_config(args, given, model_path)  # before any model is built
    check_float_tensors(infos.values())
    with torch.device("meta"):
        model = Model(args)
    expected = {k: list(v.shape) for k, v in model.state_dict().items()}
    check_tensor_shapes(args, expected, given)

    weights = {}
    for f in files:
        with safe_open(str(f), framework="pt", device=str(device)) as tensors:
            for name in tensors.keys():
                if name in expected:
                    weights[name] = tensors.get_tensor(name).to(torch_dtype)
    if not args.has_diffusion:
        # A plain Qwen3: the unused diffusion slots share the AR tensors (no copy, never run).
        for name in [k for k in expected if k not in weights]:
            weights[name] = weights[name.replace("_diff", "")]
    check_finite(model_path, {k: bool(torch.isfinite(w).all()) for k, w in weights.items()}, dtype)
    model.load_state_dict(weights, strict=True, assign=True)
    return model.eval().requires_grad_(False), config


def load(
    path_or_repo: Union[str, Path],
    device: Union[str, torch.device, None] = None,
    dtype: Optional[str] = None,
    revision: Optional[str] = None,
    return_config: bool = False,
):
    """(model, tokenizer): the tokenizer is transformers' AutoTokenizer (text only, no model code)."""
    from transformers import AutoTokenizer

    model_path = resolve_model_path(path_or_repo, revision)
    model, config = load_model(model_path, device=device, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(str(model_path))
    return (model, tokenizer, config) if return_config else (model, tokenizer)
