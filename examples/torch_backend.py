"""The same checkpoint and decoding step through PyTorch (CUDA in bf16 when available)."""

import torch

from orthrus_mlx.loader import DEFAULT_MODEL
from orthrus_mlx.torch_backend.generate import generate
from orthrus_mlx.torch_backend.loader import load

device = "cuda" if torch.cuda.is_available() else "cpu"
model, tokenizer = load(DEFAULT_MODEL, device=device)
print(generate(model, tokenizer, "def main(argv):\n", max_tokens=80))
