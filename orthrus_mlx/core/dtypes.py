"""The floating-point types a checkpoint may be loaded or converted to, by name.

Each backend maps the names onto its own types (`orthrus_mlx.loader.DTYPES`,
`orthrus_mlx.torch_backend.loader.DTYPES`).
"""

from typing import Optional

DTYPE_NAMES = ("float32", "float16", "bfloat16")


def check_dtype(name: Optional[str]) -> None:
    """None (keep the checkpoint's) or one of DTYPE_NAMES; anything else is a ValueError."""
    if name is not None and name not in DTYPE_NAMES:
        raise ValueError(f"Unsupported dtype {name!r}: dtype must be one of {', '.join(DTYPE_NAMES)}")
