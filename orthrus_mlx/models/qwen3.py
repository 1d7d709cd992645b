"""Orthrus on Qwen3: mlx-lm's Qwen3 (the AR view, untouched) plus the diffusion view.

`model(tokens, cache=cache)` behaves exactly like `mlx_lm.models.qwen3.Model`; `model.draft`
is the diffusion view (models/diffusion.py), with its own q/k norms as the base has them.
"""

from dataclasses import dataclass

from mlx_lm.models import qwen3

from .diffusion import DiffusionAttention, DiffusionBlock, DiffusionModel, OrthrusArgs


@dataclass
class ModelArgs(OrthrusArgs, qwen3.ModelArgs):
    pass


class Attention(DiffusionAttention, qwen3.Attention):
    pass


class TransformerBlock(DiffusionBlock, qwen3.TransformerBlock):
    def __init__(self, args: ModelArgs):
        super().__init__(args)
        self.self_attn = Attention(args)


class Qwen3Model(qwen3.Qwen3Model):
    def __init__(self, args: ModelArgs):
        super().__init__(args)
        self.layers = [TransformerBlock(args) for _ in range(args.num_hidden_layers)]


class Model(DiffusionModel, qwen3.Model):
    def __init__(self, args: ModelArgs):
        super().__init__(args)
        self.model = Qwen3Model(args)
