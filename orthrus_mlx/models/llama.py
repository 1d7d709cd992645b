"""Orthrus on Llama: mlx-lm's Llama (the AR view, untouched) plus the diffusion view.

`model(tokens, cache=cache)` behaves exactly like `mlx_lm.models.llama.Model`; `model.draft`
is the diffusion view (models/diffusion.py), without q/k norms since the base has none.
"""

from dataclasses import dataclass
from typing import Optional

from mlx_lm.models import llama

from .diffusion import DiffusionAttention, DiffusionBlock, DiffusionModel, OrthrusArgs


@dataclass
class ModelArgs(OrthrusArgs, llama.ModelArgs):
    rope_parameters: Optional[dict] = None

    def __post_init__(self):
        super().__post_init__()
        # transformers >= 5 nests rope_theta and rope_scaling under rope_parameters.
        if self.rope_parameters:
            self.rope_theta = self.rope_parameters.get("rope_theta", self.rope_theta)
            if self.rope_scaling is None and self.rope_parameters.get("rope_type", "default") != "default":
                self.rope_scaling = self.rope_parameters
        # A rotating cache cannot hold the drafted block's slots.
        if any(kind != "full_attention" for kind in self.layer_types):
            raise ValueError("Sliding-window attention layers are not supported (layer_types).")


class Attention(DiffusionAttention, llama.Attention):
    pass


class TransformerBlock(DiffusionBlock, llama.TransformerBlock):
    def __init__(self, args: ModelArgs):
        super().__init__(args)
        self.self_attn = Attention(args)


class LlamaModel(llama.LlamaModel):
    def __init__(self, args: ModelArgs):
        super().__init__(args)
        self.layers = [TransformerBlock(args) for _ in range(args.num_hidden_layers)]


class Model(DiffusionModel, llama.Model):
    def __init__(self, args: ModelArgs):
        super().__init__(args)
        self.model = LlamaModel(args)
