"""`orthrus-convert` / `orthrus-mlx convert`: flags mirror `mlx_lm.convert`, one to one onto `convert()`."""

import argparse
import sys
from typing import List, Optional

from mlx_lm.utils import MAX_FILE_SIZE_GB

from orthrus_mlx.loader import DEFAULT_MODEL

from . import drafter
from .converter import convert
from .plan import BITS, DTYPES, GROUP_SIZES


def bits_or_none(value: str) -> int:
    """A bit width, or `none` (returned as 0): leave that part unquantized."""
    if value.lower() in ("none", "0"):
        return 0
    try:
        bits = int(value)
    except ValueError:
        bits = -1
    if bits not in BITS:
        raise argparse.ArgumentTypeError(f"choose one of {list(BITS)} or none, got {value!r}")
    return bits


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--hf-path", "--model", default=str(DEFAULT_MODEL),
        help="Source checkpoint: a local folder or a Hugging Face repo id (default: the shipped tiny model).",
    )
    parser.add_argument("--mlx-path", default="mlx_model", help="Folder to write (default: mlx_model).")
    parser.add_argument("--revision", default=None, help="Hub revision, for a repo id.")
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), default=None,
        help="Type of the unquantized tensors and of scales/biases (default: the checkpoint's).",
    )
    parser.add_argument("-q", "--quantize", action="store_true", help="Quantize the linear layers and embeddings.")
    parser.add_argument("--q-bits", type=int, choices=BITS, default=None, help="Bits per weight (default 4).")
    parser.add_argument(
        "--q-group-size", type=int, choices=GROUP_SIZES, default=None, help="Quantization group size (default 64)."
    )
    parser.add_argument(
        "--diffusion-bits", type=bits_or_none, default=None, metavar="{2,3,4,5,6,8,none}",
        help="Bits for the diffusion view's projections (*_proj_diff); none keeps them "
        "unquantized (default: --q-bits).",
    )
    parser.add_argument(
        "--embed-bits", type=bits_or_none, default=None, metavar="{2,3,4,5,6,8,none}",
        help="Bits for embed_tokens and lm_head; none keeps them unquantized (default: --q-bits).",
    )
    parser.add_argument(
        "--force", action="store_true",
        help="Replace a non-empty --mlx-path, only if it is a model folder: config.json, *.safetensors "
        "and checkpoint files (*.json, *.jinja, tokenizer files, *.md, LICENSE*), nothing else.",
    )
    parser.add_argument(
        "--max-shard-size-gb", type=float, default=MAX_FILE_SIZE_GB,
        help=f"Largest output shard (default {MAX_FILE_SIZE_GB}).",
    )
    parser.add_argument("--no-progress", action="store_true", help="No progress bar.")
    drafter.add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """Bad input raises ValueError / OSError: the caller prints it as one line."""
    split_or_merge = drafter.run(args)
    if split_or_merge is not None:
        return split_or_merge
    path = convert(
        args.hf_path,
        args.mlx_path,
        dtype=args.dtype,
        quantize=args.quantize,
        q_bits=args.q_bits,
        q_group_size=args.q_group_size,
        diffusion_bits=args.diffusion_bits,
        embed_bits=args.embed_bits,
        force=args.force,
        revision=args.revision,
        max_file_size_gb=args.max_shard_size_gb,
        progress=not args.no_progress,
    )
    print(f"Wrote {path}", file=sys.stderr)
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="orthrus-convert",
        description="Convert a Hugging Face Orthrus checkpoint to an MLX folder, optionally quantized.",
    )
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except KeyboardInterrupt:
        return 130
    except (ValueError, OSError) as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
