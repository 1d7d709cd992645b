"""orthrus_convert: Hugging Face Orthrus/Qwen3 safetensors -> MLX folder, cast and quantized.

Installed from the top-level `convert/` folder under the import name `orthrus_convert`.
"""

from .converter import convert
from .plan import BITS, GROUP_SIZES, Quant, Recipe, make_recipe

__all__ = ["BITS", "GROUP_SIZES", "Quant", "Recipe", "convert", "make_recipe"]
