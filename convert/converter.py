"""Hugging Face Orthrus checkpoint -> MLX folder, cast and optionally quantized, streamed.

One source tensor at a time: read it (lazily, from its shard), cast, quantize, write it
through to its output shard, drop it. Peak memory is about one tensor, not the model.
"""

import shutil
import sys
import warnings
from pathlib import Path
from typing import Callable, Iterable, List, Optional, Union

import mlx.core as mx
from mlx_lm.utils import MAX_FILE_SIZE_GB, save_config

from .plan import DTYPES, TensorPlan, make_plan, make_recipe
from .source import open_source
from .writer import ShardedWriter, staging_folder

# Everything of the source folder but its weights and config: tokenizer, chat template,
# generation config. Remote code (*.py) is not copied: it is never run.
CARRIED_FILES = ["*.json", "*.jinja", "*.txt", "tokenizer.model", "*.tiktoken"]
NOT_CARRIED = {"config.json", "model.safetensors.index.json"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


def check_target(target: Path, source: Path, force: bool) -> None:
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"--mlx-path {target} is a file, not a folder")
    if target.exists() and any(target.iterdir()) and not force:
        raise FileExistsError(f"--mlx-path {target} exists and is not empty; pass --force to replace it")
    t, s = target.resolve(), source.resolve()
    if t == s or s in t.parents or t in s.parents:
        raise ValueError(f"--mlx-path {target} overlaps the source checkpoint {source}")


def convert_tensor(plan: TensorPlan, weight: mx.array) -> List[mx.array]:
    """The output arrays of one source tensor, in `plan.outputs()` order."""
    weight = weight.astype(DTYPES[plan.dtype])
    if plan.quant is None:
        return [weight]
    return list(mx.quantize(weight, plan.quant.group_size, plan.quant.bits, mode="affine"))


def write_weights(
    plans: List[TensorPlan],
    folder: Path,
    max_file_size_gb: float,
    progress: Callable[[Iterable[TensorPlan]], Iterable[TensorPlan]],
) -> None:
    writer = ShardedWriter(folder, [o for p in plans for o in p.outputs()], max_file_size_gb)
    loaded_file, arrays = None, {}
    try:
        for plan in progress(plans):
            if plan.source.file != loaded_file:
                # Lazy: nothing is read until a tensor is evaluated.
                loaded_file, arrays = plan.source.file, mx.load(str(plan.source.file))
            outputs = convert_tensor(plan, arrays.pop(plan.source.name))
            mx.eval(outputs)
            for (name, _, _), array in zip(plan.outputs(), outputs):
                writer.write(name, array)
            del outputs
        writer.close()
    finally:
        writer.abort()


def copy_side_files(source: Path, folder: Path) -> None:
    copied = set()
    for pattern in CARRIED_FILES:
        for file in sorted(source.glob(pattern)):
            if file.is_file() and file.name not in NOT_CARRIED and file.name not in copied:
                shutil.copy(file, folder / file.name)
                copied.add(file.name)
    if not copied.intersection(TOKENIZER_FILES):
        warnings.warn(
            f"No tokenizer files in {source}: the output loads with orthrus_mlx.load_model "
            "but not with orthrus_mlx.load",
            stacklevel=3,
        )


def tqdm_progress(plans: List[TensorPlan]) -> Iterable[TensorPlan]:
    from tqdm import tqdm

    return tqdm(plans, desc="Converting", unit="tensor", file=sys.stderr)


def convert(
    hf_path: Union[str, Path],
    mlx_path: Union[str, Path] = "mlx_model",
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
) -> Path:
    """Convert `hf_path` (folder or Hub repo id) into the MLX folder `mlx_path`.

    `dtype` casts every float tensor (default: the checkpoint's declared dtype).
    With `quantize`, linear layers and embeddings get `q_bits`/`q_group_size` (4/64);
    `diffusion_bits` and `embed_bits` override the diffusion view's projections and
    embed_tokens/lm_head: None follows `q_bits`, 0 leaves them unquantized.
    Everything is checked before anything is written; the folder appears only complete.
    """
    recipe = make_recipe(quantize, q_bits, q_group_size, diffusion_bits, embed_bits)
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"Unsupported dtype {dtype!r}: choose one of {sorted(DTYPES)}")
    source = open_source(hf_path, revision)
    target = Path(mlx_path).expanduser()
    check_target(target, source.path, force)
    plans, config = make_plan(source, recipe, dtype)

    with staging_folder(target, replace=force) as folder:
        write_weights(plans, folder, max_file_size_gb, tqdm_progress if progress else iter)
        save_config(config, folder / "config.json")
        copy_side_files(source.path, folder)
    return target
