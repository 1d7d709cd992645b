"""Load an Orthrus (or plain Qwen3) checkpoint into the PyTorch model, straight from safetensors.

No `trust_remote_code` and no transformers model class: the tensors go by their checkpoint
names into `Model`. Defaults: bfloat16 on CUDA, float32 on CPU.
"""

import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
from safetensors import safe_open

from ..checkpoint import read_config, read_safetensors_header, resolve_model_path, weight_files
from .model import Model, ModelArgs

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DIFFUSION_PARAMS = ("q_proj_diff", "k_proj_diff", "v_proj_diff", "o_proj_diff", "q_norm_diff", "k_norm_diff")


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def model_args(config: Dict[str, Any]) -> ModelArgs:
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
    args = ModelArgs.from_dict(config)
    if not args.has_diffusion:
        warnings.warn(
            "config.json has no block_size/mask_token_id: this is a plain Qwen3 "
            "checkpoint, running in AR mode without diffusion drafting.",
            stacklevel=3,
        )
        return args
    if args.block_size < 2:
        raise ValueError(f"block_size must be >= 2, got {args.block_size}")
    if not 0 <= args.mask_token_id < args.vocab_size:
        raise ValueError(
            f"mask_token_id {args.mask_token_id} is outside the vocabulary [0, {args.vocab_size})"
        )
    return args


def check_tensors(args: ModelArgs, expected: Dict[str, List[int]], files: List[Path]) -> None:
    """Name every missing, unexpected or misshapen tensor before loading any data."""
    given = {}
    for f in files:
        given.update({k: v["shape"] for k, v in read_safetensors_header(f).items()})
    given = {k: v for k, v in given.items() if "rotary_emb.inv_freq" not in k}
    if args.tie_word_embeddings:
        given.pop("lm_head.weight", None)
    is_diff = lambda k: k.split(".")[-2] in DIFFUSION_PARAMS
    if any(is_diff(k) for k in given) and not args.has_diffusion:
        raise ValueError(
            "The checkpoint has diffusion tensors (*_proj_diff) but its config.json "
            "lacks block_size and/or mask_token_id."
        )
    if not args.has_diffusion:
        expected = {k: v for k, v in expected.items() if not is_diff(k)}
    missing = sorted(set(expected) - set(given))
    extra = sorted(set(given) - set(expected))
    if missing:
        raise ValueError(f"Missing tensors in the checkpoint: {missing[:10]}")
    if extra:
        raise ValueError(f"Unexpected tensors in the checkpoint: {extra[:10]}")
    for name, shape in given.items():
        if list(shape) != expected[name]:
            raise ValueError(
                f"Tensor {name} has shape {tuple(shape)}, expected {tuple(expected[name])}"
            )


def load_model(
    path_or_repo: Union[str, Path],
    device: Union[str, torch.device, None] = None,
    dtype: Optional[str] = None,
    revision: Optional[str] = None,
) -> Tuple[Model, Dict[str, Any]]:
    """(model, config) in eval mode on `device`; bfloat16 on CUDA and float32 on CPU unless `dtype`."""
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    device = torch.device(device) if device is not None else default_device()
    torch_dtype = DTYPES[dtype] if dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    model_path = resolve_model_path(path_or_repo, revision)
    config = read_config(model_path)
    args = model_args(config)
    with torch.device("meta"):
        model = Model(args)
    expected = {k: list(v.shape) for k, v in model.state_dict().items()}
    files = weight_files(model_path)
    check_tensors(args, expected, files)

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
