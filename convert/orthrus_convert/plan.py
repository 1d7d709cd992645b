"""What becomes of each tensor: its dtype, whether and how it is quantized, and the config
entries that let `mlx_lm.utils.load_model` build every layer as it was written."""

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import mlx.core as mx

from orthrus_mlx.core.checkpoint import DIFFUSION_PARAMS
from orthrus_mlx.core.dtypes import check_dtype
from orthrus_mlx.loader import DTYPES

from .source import Source

BITS = (2, 3, 4, 5, 6, 8)
GROUP_SIZES = (32, 64, 128)
DEFAULT_BITS, DEFAULT_GROUP_SIZE = 4, 64  # mlx-lm's affine defaults
SAFETENSORS_TO_DTYPE = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}
EMBEDDING_MODULES = ("model.embed_tokens", "lm_head")


@dataclass(frozen=True)
class Quant:
    bits: int
    group_size: int

    def as_config(self) -> Dict[str, Any]:
        return {"group_size": self.group_size, "bits": self.bits, "mode": "affine"}


@dataclass(frozen=True)
class Recipe:
    """How each part of the model is quantized; None keeps that part unquantized."""

    base: Quant
    diffusion: Optional[Quant]
    embeddings: Optional[Quant]

    def for_module(self, path: str) -> Optional[Quant]:
        name = path.rsplit(".", 1)[-1]
        if name in DIFFUSION_PARAMS:
            return self.diffusion
        if path in EMBEDDING_MODULES:
            return self.embeddings
        return self.base


def make_recipe(
    quantize: bool,
    q_bits: Optional[int] = None,
    q_group_size: Optional[int] = None,
    diffusion_bits: Optional[int] = None,
    embed_bits: Optional[int] = None,
) -> Optional[Recipe]:
    """None without `quantize`. `diffusion_bits` / `embed_bits`: None follows `q_bits`, 0 keeps
    that part unquantized, in the output dtype."""
    if not quantize:
        given = {"--q-bits": q_bits, "--q-group-size": q_group_size,
                 "--diffusion-bits": diffusion_bits, "--embed-bits": embed_bits}
        flags = [k for k, v in given.items() if v is not None]
        if flags:
            raise ValueError(f"{', '.join(flags)} only apply with -q/--quantize")
        return None
    bits = DEFAULT_BITS if q_bits is None else q_bits
    group_size = DEFAULT_GROUP_SIZE if q_group_size is None else q_group_size
    if bits not in BITS:
        raise ValueError(f"Unsupported bits {bits}: choose one of {list(BITS)}")
    if group_size not in GROUP_SIZES:
        raise ValueError(f"Unsupported group size {group_size}: choose one of {list(GROUP_SIZES)}")
    base = Quant(bits, group_size)

    def part(flag: str, value: Optional[int]) -> Optional[Quant]:
        if value is None:
            return base
        if value == 0:
            return None
        if value not in BITS:
            raise ValueError(f"Unsupported {flag} {value}: choose one of {list(BITS)} or none")
        return Quant(value, group_size)

    return Recipe(base, part("--diffusion-bits", diffusion_bits), part("--embed-bits", embed_bits))


@dataclass(frozen=True)
class TensorPlan:
    source: Any  # SourceTensor
    dtype: str  # the output float dtype (of the weight, or of scales and biases)
    quant: Optional[Quant]

    def outputs(self) -> List[Tuple[str, Any, Tuple[int, ...]]]:
        """(name, mlx dtype, shape) of each tensor written, in writing order."""
        name, shape, dtype = self.source.name, self.source.shape, DTYPES[self.dtype]
        if self.quant is None:
            return [(name, dtype, shape)]
        path = name[: -len(".weight")]
        rows, cols = shape[:-1], shape[-1]
        groups = cols // self.quant.group_size
        return [
            (f"{path}.weight", mx.uint32, (*rows, cols * self.quant.bits // 32)),
            (f"{path}.scales", dtype, (*rows, groups)),
            (f"{path}.biases", dtype, (*rows, groups)),
        ]


def output_dtype(config: Dict[str, Any], dtype: Optional[str]) -> Optional[str]:
    """`dtype` if given, else the checkpoint's declared one; None keeps each tensor's own."""
    if dtype is not None:
        check_dtype(dtype)
        return dtype
    declared = config.get("torch_dtype", config.get("dtype"))
    return declared if declared in DTYPES else None


def make_plan(
    source: Source, recipe: Optional[Recipe], dtype: Optional[str]
) -> Tuple[List[TensorPlan], Dict[str, Any]]:
    """One plan per source tensor, and the output config.json (quantization in mlx-lm's format)."""
    dtype = output_dtype(source.config, dtype)
    plans = []
    for t in source.tensors:
        path = t.name[: -len(".weight")] if t.name.endswith(".weight") else None
        quant = None
        if recipe is not None and path in source.quantizable:
            quant = recipe.for_module(path)
        if quant is not None and t.shape[-1] % quant.group_size:
            raise ValueError(
                f"Group size {quant.group_size} does not divide the width {t.shape[-1]} of "
                f"{t.name} {t.shape}: choose a --q-group-size that divides it"
            )
        plans.append(TensorPlan(t, dtype or SAFETENSORS_TO_DTYPE[t.dtype], quant))

    config = dict(source.config)
    if dtype is not None:
        config["torch_dtype"] = dtype
        if "dtype" in config:
            config["dtype"] = dtype
    if recipe is not None:
        # Top level: the base's settings. Per module only what differs from them:
        # a dict of settings, or false for a layer left unquantized.
        quantization: Dict[str, Any] = recipe.base.as_config()
        for path in sorted(source.quantizable):
            quant = recipe.for_module(path)
            if quant != recipe.base:
                quantization[path] = quant.as_config() if quant else False
        config["quantization"] = quantization
        config["quantization_config"] = quantization
    return plans, config
