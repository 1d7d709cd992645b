"""`convert --split-drafter` and `--merge-drafter`: a full Orthrus checkpoint <-> base + drafter adapter.

Split streams the source as a conversion does (the same --dtype / -q flags; --diffusion-bits
quantizes the adapter on its own): the base goes to --mlx-path, the diffusion tensors to the
adapter folder (orthrus_mlx/drafter.py describes it), fingerprinted against that base as written.
Merge loads a base from any source `load` takes (folder, repo id, GGUF file) with an adapter,
and writes one folder that loads as a full Orthrus checkpoint; tensors are written as loaded.
"""

import argparse
import sys
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import mlx.nn as nn
from mlx_lm.utils import MAX_FILE_SIZE_GB, save_config, save_model

from orthrus_mlx.core.checkpoint import is_diffusion_tensor
from orthrus_mlx.drafter import adapter_config
from orthrus_mlx.loader import load, load_model, locate

from .converter import copy_side_files, tqdm_progress, write_weights
from .plan import make_plan, make_recipe
from .source import open_source, read_raw_config
from .target import check_target, staging_folder

ORTHRUS_FIELDS = ("block_size", "mask_token_id")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--split-drafter", metavar="DRAFTER_PATH", default=None,
        help="Write the diffusion view alone to this drafter adapter folder and the base, without "
        "it, to --mlx-path (--diffusion-bits quantizes the adapter on its own).",
    )
    group.add_argument(
        "--merge-drafter", metavar="DRAFTER_PATH", default=None,
        help="Write --hf-path (a base: folder, repo id or GGUF file) with this drafter adapter "
        "merged in, as one Orthrus checkpoint folder at --mlx-path.",
    )


def without_diffusion(config: Dict[str, Any]) -> Dict[str, Any]:
    """The base's config: no Orthrus fields, no quantization entries of diffusion modules."""
    config = {k: v for k, v in config.items() if k not in ORTHRUS_FIELDS}
    for key in ("quantization", "quantization_config"):
        if key in config:
            config[key] = {k: v for k, v in config[key].items() if not is_diffusion_tensor(f"{k}.weight")}
    return config


def split_drafter(
    hf_path: Union[str, Path],
    mlx_path: Union[str, Path],
    drafter_path: Union[str, Path],
    dtype: Optional[str] = None,
    quantize: bool = False,
    q_bits: Optional[int] = None,
    q_group_size: Optional[int] = None,
    diffusion_bits: Optional[int] = None,
    embed_bits: Optional[int] = None,
    force: bool = False,
    revision: Optional[str] = None,
    max_file_size_gb: float = MAX_FILE_SIZE_GB,
    progress: bool = True,
) -> Tuple[Path, Path]:
    """Convert `hf_path` (a full Orthrus checkpoint) into a base folder and an adapter folder."""
    recipe = make_recipe(quantize, q_bits, q_group_size, diffusion_bits, embed_bits)
    source = open_source(hf_path, revision)
    if not source.args.has_diffusion:
        raise ValueError(f"{source.path} has no diffusion view (block_size/mask_token_id) to split off")
    base_target, drafter_target = Path(mlx_path).expanduser(), Path(drafter_path).expanduser()
    for target in (base_target, drafter_target):
        check_target(target, source.path, force)
    if base_target.resolve() == drafter_target.resolve():
        raise ValueError("--split-drafter must name another folder than --mlx-path")
    plans, config = make_plan(source, recipe, dtype)
    base_plans = [p for p in plans if not is_diffusion_tensor(p.source.name)]
    drafter_plans = [p for p in plans if is_diffusion_tensor(p.source.name)]
    quantization = recipe.diffusion.as_config() if recipe is not None and recipe.diffusion else None

    with (
        staging_folder(base_target, replace=force) as base_dir,
        staging_folder(drafter_target, replace=force) as adapter_dir,
    ):
        write_weights(base_plans, base_dir, max_file_size_gb, tqdm_progress if progress else iter)
        save_config(without_diffusion(config), base_dir / "config.json")
        copy_side_files(source.path, base_dir)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the base alone is a plain model: fine here
            base, _ = load_model(base_dir, lazy=True)
        write_weights(drafter_plans, adapter_dir, max_file_size_gb, iter)
        fields = {k: config[k] for k in ORTHRUS_FIELDS}
        save_config(adapter_config(base, **fields, quantization=quantization), adapter_dir / "config.json")
    return base_target, drafter_target


def quantization_of(model: nn.Module) -> Optional[Dict[str, Any]]:
    """mlx-lm's `quantization` entry describing the model's quantized layers as they are."""
    per_module = {
        name: {"group_size": m.group_size, "bits": m.bits, "mode": m.mode}
        for name, m in model.named_modules()
        if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))
    }
    if not per_module:
        return None
    common = Counter(tuple(v.items()) for v in per_module.values()).most_common(1)[0][0]
    return {**dict(common), **{k: v for k, v in per_module.items() if tuple(v.items()) != common}}


def merge_drafter(
    base: Union[str, Path],
    drafter_path: Union[str, Path],
    mlx_path: Union[str, Path],
    force: bool = False,
    revision: Optional[str] = None,
) -> Path:
    """One checkpoint folder holding the base and the adapter's diffusion view."""
    base_path, adapter_path = locate(base, drafter_path, revision)
    target = Path(mlx_path).expanduser()
    for source in (base_path, adapter_path):
        check_target(target, source, force)
    model, tokenizer, config = load(base_path, lazy=True, drafter=adapter_path, return_config=True)
    merged = read_raw_config(base_path) if base_path.is_dir() else dict(config)
    merged = {k: v for k, v in merged.items() if k not in ("quantization", "quantization_config")}
    merged.update({k: config[k] for k in ORTHRUS_FIELDS})
    quantization = quantization_of(model)
    if quantization:
        merged["quantization"] = quantization

    with staging_folder(target, replace=force) as folder:
        save_model(folder, model)
        save_config(merged, folder / "config.json")
        if base_path.is_dir():
            copy_side_files(base_path, folder)
        else:  # a GGUF file: its tokenizer, as built from the metadata
            tokenizer._tokenizer.save_pretrained(str(folder))
    return target


def run(args: argparse.Namespace) -> Optional[int]:
    """The split or merge the flags ask for; None when they ask for neither."""
    if args.split_drafter:
        base, adapter = split_drafter(
            args.hf_path, args.mlx_path, args.split_drafter, dtype=args.dtype, quantize=args.quantize,
            q_bits=args.q_bits, q_group_size=args.q_group_size, diffusion_bits=args.diffusion_bits,
            embed_bits=args.embed_bits, force=args.force, revision=args.revision,
            max_file_size_gb=args.max_shard_size_gb, progress=not args.no_progress,
        )
        print(f"Wrote the base to {base} and the drafter adapter to {adapter}", file=sys.stderr)
        return 0
    if args.merge_drafter:
        conversion = [f for f, v in (("--dtype", args.dtype), ("-q", args.quantize)) if v]
        if conversion:
            raise ValueError(f"{', '.join(conversion)} do not apply to --merge-drafter: tensors are kept as stored")
        path = merge_drafter(args.hf_path, args.merge_drafter, args.mlx_path, force=args.force, revision=args.revision)
        print(f"Wrote {path}", file=sys.stderr)
        return 0
    return None
