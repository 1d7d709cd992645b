"""Drafter adapters: an Orthrus diffusion view on its own, applied to a base the user already has.

An adapter is a folder with `config.json` and `model.safetensors` (plus its index) holding only
the diffusion tensors, under their checkpoint names (`model.layers.N.self_attn.q_proj_diff.weight`
...; quantized ones with their `scales` and `biases`):

    {"orthrus_drafter": 1,
     "base": {"model_type", "hidden_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "head_dim", "vocab_size", "fingerprint"},
     "block_size": 32, "mask_token_id": 151669,
     "quantization": {...}}   # optional, mlx-lm's entry, for the adapter's own tensors

A base of another architecture or shape is refused. The fingerprint says whether the base is
the very one the drafter was trained against; any other (a quantized copy, say) gets one
warning: verification keeps the output exactly that base's, drafts are just accepted less often.
"""

import hashlib
import json
import warnings
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from .core.checkpoint import check_orthrus_fields, check_tensor_shapes, is_diffusion_tensor, weight_files
from .models import architecture
from .models.diffusion import DiffusionModel, linear_shape

ADAPTER_FORMAT = 1
SHAPE_FIELDS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
)
FINGERPRINT_ROWS = 64


def float_rows(module: nn.Module, rows: int) -> mx.array:
    """The first rows of a linear or embedding weight, dequantized if need be, in float32.

    Scales and biases go to float32 first: the values are then exactly those the quantized
    matmul computes with (mx.dequantize in float16 would round them)."""
    weight = module.weight[:rows]
    if hasattr(module, "scales"):  # rows are quantized independently: a slice dequantizes alone
        biases = module.get("biases")
        weight = mx.dequantize(
            weight, module.scales[:rows].astype(mx.float32),
            None if biases is None else biases[:rows].astype(mx.float32),
            module.group_size, module.bits, module.mode,
        )
    return weight.astype(mx.float32)


def fingerprint(embed_tokens: np.ndarray, q_proj: np.ndarray) -> str:
    """sha256 of the first rows of the embeddings and of layer 0's q_proj (Hugging Face row
    order), as float32 bytes. Exact: a float base and its quantized copy differ."""
    digest = hashlib.sha256()
    for weight in (embed_tokens, q_proj):
        digest.update(np.ascontiguousarray(weight[:FINGERPRINT_ROWS], dtype=np.float32).tobytes())
    return digest.hexdigest()


def base_fingerprint(model: DiffusionModel) -> str:
    """The fingerprint of a loaded model's base weights, as loaded (cheap: 2 x 64 rows)."""
    rows = [float_rows(m, FINGERPRINT_ROWS) for m in (model.model.embed_tokens, model.layers[0].self_attn.q_proj)]
    return fingerprint(*(np.array(r) for r in rows))


def describe_base(model: DiffusionModel, fingerprint: bool = True) -> Dict[str, Any]:
    """The base fields of an adapter config, read off a loaded model."""
    attn = model.layers[0].self_attn
    base = {
        "model_type": model.args.model_type,
        "hidden_size": model.args.hidden_size,
        "num_hidden_layers": len(model.layers),
        "num_attention_heads": attn.n_heads,
        "num_key_value_heads": attn.n_kv_heads,
        "head_dim": linear_shape(attn.q_proj)[0] // attn.n_heads,
        "vocab_size": model.args.vocab_size,
    }
    if fingerprint:
        base["fingerprint"] = base_fingerprint(model)
    return base


def adapter_config(
    model: DiffusionModel, block_size: int, mask_token_id: int, quantization: Optional[Dict[str, Any]] = None
) -> Dict[str, Any]:
    """config.json of an adapter trained against `model`'s base weights."""
    config = {
        "orthrus_drafter": ADAPTER_FORMAT,
        "base": describe_base(model),
        "block_size": block_size,
        "mask_token_id": mask_token_id,
    }
    if quantization:
        config["quantization"] = quantization
    return config


def is_adapter(config: Dict[str, Any]) -> bool:
    return "orthrus_drafter" in config


def read_adapter(path: Path) -> Tuple[Dict[str, Any], Dict[str, mx.array]]:
    """(config, tensors) of an adapter folder; ValueError if it is not one."""
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"No config.json in the drafter folder {path}")
    with open(config_file) as f:
        config = json.load(f)
    if config.get("orthrus_drafter") != ADAPTER_FORMAT:
        raise ValueError(f"{path} is not an Orthrus drafter adapter (its config.json lacks \"orthrus_drafter\": 1)")
    missing = [k for k in ("base", "block_size", "mask_token_id") if k not in config]
    if missing:
        raise ValueError(f"The drafter config {config_file} lacks {missing}")
    weights = {}
    for file in weight_files(Path(path)):
        weights.update(mx.load(str(file)))
    return config, weights


def check_base(model: DiffusionModel, config: Dict[str, Any], path: Path) -> None:
    """A clear error if the adapter cannot fit this base; one warning if it was trained on another."""
    wanted, have = config["base"], describe_base(model, fingerprint=False)
    if architecture(wanted.get("model_type")) != architecture(have["model_type"]):
        raise ValueError(
            f"The drafter {path} is for a {wanted.get('model_type')} base, this base is {have['model_type']}"
        )
    wrong = [f"{k} {wanted.get(k)} (the base has {have[k]})" for k in SHAPE_FIELDS if wanted.get(k) != have[k]]
    if wrong:
        raise ValueError(f"The drafter {path} does not fit this base: it was made for {', '.join(wrong)}")
    if wanted.get("fingerprint") != base_fingerprint(model):
        warnings.warn(
            f"The drafter {path} was trained against other base weights (fingerprint differs, e.g. a "
            "quantized copy): the output stays exactly this base's, fewer drafts may be accepted.",
            stacklevel=4,
        )


def quantize_diffusion_view(model: DiffusionModel, quantization: Optional[Dict[str, Any]], weights: Dict) -> None:
    """Quantize the diffusion modules the adapter stores quantized, as its config says."""
    if not quantization:
        return

    def predicate(path: str, module: nn.Module):
        if not is_diffusion_tensor(f"{path}.weight") or f"{path}.scales" not in weights:
            return False
        return quantization.get(path, True)

    nn.quantize(
        model, quantization["group_size"], quantization["bits"],
        mode=quantization.get("mode", "affine"), class_predicate=predicate,
    )


def attach_drafter(model: DiffusionModel, path: Path) -> None:
    """Give a loaded base the adapter's diffusion view (replacing any it had)."""
    config, weights = read_adapter(path)
    check_base(model, config, path)
    model.add_diffusion_view(config["block_size"], config["mask_token_id"])
    check_orthrus_fields(model.args)
    quantize_diffusion_view(model, config.get("quantization"), weights)
    expected = {k: list(v.shape) for k, v in tree_flatten(model.parameters()) if is_diffusion_tensor(k)}
    try:
        check_tensor_shapes(model.args, expected, {k: list(v.shape) for k, v in weights.items()})
    except ValueError as e:
        raise ValueError(f"Drafter {path}: {e}") from e
    model.load_weights(list(weights.items()), strict=False)
