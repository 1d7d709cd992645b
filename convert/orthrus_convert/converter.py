"""Hugging Face Orthrus checkpoint -> MLX folder, cast and optionally quantized, streamed.

One block of rows at a time: read it from its shard, cast, quantize, write it through to
its output shard, drop it. Peak memory is about one block (plus a tensor's scales and
biases), not one tensor, let alone the model.
"""

import shutil
import sys
from pathlib import Path
from typing import Callable, Iterable, Iterator, List, Optional, Tuple, Union

import mlx.core as mx
from mlx_lm.utils import MAX_FILE_SIZE_GB, save_config

from orthrus_mlx.core.checkpoint import check_finite
from orthrus_mlx.core.dtypes import check_dtype

from .plan import DTYPES, SAFETENSORS_TO_DTYPE, TensorPlan, make_plan, make_recipe
from .source import open_source, read_rows
from .target import check_target, remove_stale_staging, staging_folder
from .writer import ShardedWriter

# Everything of the source folder but its weights and config: tokenizer, chat template,
# generation config, model card. Remote code (*.py) is not copied: it is never run. All are
# MODEL_FILES, so --force can replace the output later.
CARRIED_FILES = ["*.json", "*.jinja", "merges.txt", "vocab.txt", "tokenizer.model", "*.tiktoken", "README.md"]
NOT_CARRIED = {"config.json", "model.safetensors.index.json"}
# Rows per block are chosen so a block holds about this many elements (64 MB in float32).
CHUNK_ELEMENTS = 1 << 24


def row_blocks(shape: Tuple[int, ...]) -> List[Tuple[int, int]]:
    """Row ranges of about CHUNK_ELEMENTS each; a 0-d or 1-d tensor is one block."""
    if len(shape) < 2:
        return [(0, shape[0] if shape else 1)]
    per_row = 1
    for s in shape[1:]:
        per_row *= s
    step = max(1, CHUNK_ELEMENTS // per_row)
    return [(r, min(r + step, shape[0])) for r in range(0, shape[0], step)]


def write_tensor(writer: ShardedWriter, plan: TensorPlan) -> None:
    """Read, cast and quantize one tensor block by block: memory holds one block at a time.

    Quantization groups run along the last axis, so row blocks quantize exactly as the
    whole tensor would.
    """
    source, dtype = plan.source, DTYPES[plan.dtype]
    names = [name for name, _, _ in plan.outputs()]
    blocks = row_blocks(source.shape)

    def rows(a: int, b: int) -> mx.array:
        """Rows [a, b) in the output dtype; NaN or inf (in the source or from the cast) refused by name."""
        w = read_rows(source, a, b).astype(dtype)
        cast = plan.dtype if plan.dtype != SAFETENSORS_TO_DTYPE[source.dtype] else None
        check_finite(source.file, {source.name: mx.isfinite(w).all().item()}, cast)
        return w

    if len(source.shape) < 2:
        writer.write(names[0], [rows(0, blocks[0][1])])
        return
    if plan.quant is None:
        writer.write(names[0], (rows(a, b) for a, b in blocks))
        return
    scales, biases = [], []

    def packed() -> Iterator[mx.array]:
        for a, b in blocks:
            w = rows(a, b)
            w, s, z = mx.quantize(w, plan.quant.group_size, plan.quant.bits, mode="affine")
            mx.eval(w, s, z)
            scales.append(s)
            biases.append(z)
            yield w

    writer.write(names[0], packed())  # packed weights go straight to disk
    writer.write(names[1], [mx.concatenate(scales)])
    writer.write(names[2], [mx.concatenate(biases)])


def write_weights(
    plans: List[TensorPlan],
    folder: Path,
    max_file_size_gb: float,
    progress: Callable[[Iterable[TensorPlan]], Iterable[TensorPlan]],
) -> None:
    writer = ShardedWriter(folder, [o for p in plans for o in p.outputs()], max_file_size_gb)
    try:
        for plan in progress(plans):
            write_tensor(writer, plan)
            # MLX keeps freed buffers for reuse; blocks differ in size, so hand them back.
            mx.clear_cache()
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
    Everything is checked before anything is written, with the loader's own checks; the
    folder appears only complete. `force` replaces an existing `mlx_path` only when it is a
    model folder (see `target.py`).
    """
    recipe = make_recipe(quantize, q_bits, q_group_size, diffusion_bits, embed_bits)
    check_dtype(dtype)
    source = open_source(hf_path, revision)
    target = Path(mlx_path).expanduser()
    remove_stale_staging(target)
    check_target(target, source.path, force)
    plans, config = make_plan(source, recipe, dtype)

    with staging_folder(target, replace=force) as folder:
        write_weights(plans, folder, max_file_size_gb, tqdm_progress if progress else iter)
        save_config(config, folder / "config.json")
        copy_side_files(source.path, folder)
    return target
