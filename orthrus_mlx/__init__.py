"""orthrus-mlx: exact, diffusion-drafted decoding of Orthrus (Qwen3) models on MLX."""

__version__ = "0.1.0"  # the one place it is written: pyproject.toml reads it from here

from .core.sampling import SamplingParams
from .core.step import DecodeStats

try:
    from .batch import BatchDecoder, batch_generate
    from .generate import GenerationResponse, generate, mlx_generate, stream_generate
    from .loader import load, load_model, load_model_and_tokenizer
    from .models.qwen3 import Model, ModelArgs
except ModuleNotFoundError as e:  # the PyTorch backend (orthrus_mlx.torch_backend) runs without mlx
    if not (e.name or "").startswith("mlx"):
        raise

__all__ = [
    "BatchDecoder",
    "DecodeStats",
    "GenerationResponse",
    "Model",
    "ModelArgs",
    "SamplingParams",
    "batch_generate",
    "generate",
    "load",
    "load_model",
    "load_model_and_tokenizer",
    "mlx_generate",
    "stream_generate",
]
