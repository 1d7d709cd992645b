"""One file per architecture, as in mlx-lm's `models/`: each is mlx-lm's model plus the
diffusion attention view (`__call__` is the AR view, `draft` the diffusion view).

The file is chosen from the config's `model_type` (through mlx-lm's own aliases, e.g.
`mistral` -> `llama`), among the files listed here: remote code is never run.
"""

import importlib
from typing import Any, Dict, Tuple, Type

from mlx_lm.utils import MODEL_REMAPPING

ARCHITECTURES = ("qwen3", "llama")


def architecture(model_type: Any) -> str:
    """The models/ file for a config's model_type; ValueError naming the supported ones."""
    name = MODEL_REMAPPING.get(model_type, model_type)
    if name not in ARCHITECTURES:
        aliases = sorted(k for k, v in MODEL_REMAPPING.items() if v in ARCHITECTURES)
        raise ValueError(
            f"model_type {model_type!r} is not supported: orthrus-mlx runs "
            f"{', '.join(ARCHITECTURES + tuple(aliases))}"
        )
    return name


def model_classes(config: Dict[str, Any]) -> Tuple[Type, Type]:
    """(Model, ModelArgs) for a config, from its model_type."""
    module = importlib.import_module(f"{__name__}.{architecture(config.get('model_type'))}")
    return module.Model, module.ModelArgs
