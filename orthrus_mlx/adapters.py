"""LoRA adapters in mlx-lm's format on the base: the AR view changes, the diffusion view does not.

Verification makes the output exactly the adapted model's whatever the drafter does; a drafter
trained on the base only drafts a little worse where the adapter moved the base away from it.
"""

from pathlib import Path
from typing import Union

import mlx.nn as nn
from mlx.utils import tree_unflatten
from mlx_lm.tuner.utils import load_adapters as mlx_lm_load_adapters


def load_adapters(model: nn.Module, adapter_path: Union[str, Path]) -> nn.Module:
    """Apply `adapter_config.json` + `adapters.safetensors` (from `mlx_lm.lora`) to `model`.

    Without `keys` in its config, mlx-lm makes every linear layer of the last `num_layers`
    layers a LoRA layer, the diffusion projections (`*_proj_diff`) included, and a module the
    two views share would change in both. The diffusion modules are put back as they were.
    """
    path = Path(adapter_path)
    if not (path / "adapter_config.json").is_file() or not (path / "adapters.safetensors").is_file():
        raise FileNotFoundError(f"{path} is no mlx-lm adapter folder (adapter_config.json + adapters.safetensors)")
    diffusion = [
        [(name, module) for name, module in layer.named_modules() if name.rsplit(".", 1)[-1].endswith("_diff")]
        for layer in model.layers
    ]
    mlx_lm_load_adapters(model, str(path))
    for layer, modules in zip(model.layers, diffusion):
        if modules:
            layer.update_modules(tree_unflatten(modules))
    model.eval()  # LoRA dropout is for training only
    return model
