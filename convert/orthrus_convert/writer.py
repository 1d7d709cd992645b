"""Write safetensors shards one tensor at a time (into a staging folder, see target.py).

mlx-lm's `save_model` holds a whole shard (5 GB) in memory before writing it. Here every
shard's header is laid out up front from the planned shapes, so each tensor goes to disk as
soon as it is computed and memory holds one tensor at a time.
"""

import json
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import mlx.core as mx
from mlx_lm.utils import MAX_FILE_SIZE_GB

SAFETENSORS_DTYPES = {mx.float32: "F32", mx.float16: "F16", mx.bfloat16: "BF16", mx.uint32: "U32"}
Spec = Tuple[str, Any, Tuple[int, ...]]  # name, mlx dtype, shape


def nbytes(spec: Spec) -> int:
    _, dtype, shape = spec
    n = dtype.size
    for s in shape:
        n *= s
    return n


def make_shards(specs: Sequence[Spec], max_file_size_gb: float = MAX_FILE_SIZE_GB) -> List[List[Spec]]:
    """mlx-lm's `make_shards`, on planned shapes instead of arrays; order is kept."""
    limit = int(max_file_size_gb * (1 << 30))
    shards: List[List[Spec]] = []
    size = 0
    for spec in specs:
        if not shards or size + nbytes(spec) > limit:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += nbytes(spec)
    return shards


def shard_names(count: int) -> List[str]:
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


class ShardedWriter:
    """Takes tensors in the planned order and writes them through to their shard files."""

    def __init__(self, folder: Path, specs: Sequence[Spec], max_file_size_gb: float = MAX_FILE_SIZE_GB):
        self.folder = folder
        self.shards = make_shards(specs, max_file_size_gb)
        self.names = shard_names(len(self.shards))
        self.queue = [(i, spec) for i, shard in enumerate(self.shards) for spec in shard]
        self.position = 0
        self.file = None
        self.shard = -1

    def write(self, name: str, parts: Iterable[mx.array]) -> None:
        """One tensor, given as consecutive row blocks that concatenate to its planned shape."""
        if self.position >= len(self.queue):
            raise ValueError(f"Tensor {name} was not planned")
        shard, (expected, dtype, shape) = self.queue[self.position]
        if name != expected:
            raise ValueError(f"Tensor {name} came where the plan has {expected}")
        if shard != self.shard:
            self._open(shard)
        rows = 0
        for part in parts:
            if part.dtype != dtype or tuple(part.shape[1:]) != tuple(shape[1:]):
                raise ValueError(
                    f"Tensor {name}: a block {part.dtype} {tuple(part.shape)} does not fit the "
                    f"plan {dtype} {tuple(shape)}"
                )
            mx.eval(part)
            if part.dtype == mx.bfloat16:  # no bfloat16 in the buffer protocol: same bits as uint16
                part = part.view(mx.uint16)
            self.file.write(memoryview(part))
            rows += part.shape[0] if part.ndim else 1
        if rows != (shape[0] if shape else 1):
            raise ValueError(f"Tensor {name}: {rows} rows written, the plan has {tuple(shape)}")
        self.position += 1

    def _open(self, shard: int) -> None:
        self._close_file()
        self.shard = shard
        self.file = open(self.folder / self.names[shard], "wb")
        self.file.write(safetensors_header(self.shards[shard], {"format": "mlx"}))

    def _close_file(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None

    def close(self) -> None:
        """Check that every planned tensor came, then write the index (as mlx-lm's save_model)."""
        self._close_file()
        if self.position != len(self.queue):
            raise ValueError(f"Only {self.position} of {len(self.queue)} planned tensors were written")
        weight_map = {
            spec[0]: self.names[i] for i, shard in enumerate(self.shards) for spec in shard
        }
        index = {
            "metadata": {"total_size": sum(nbytes(spec) for _, spec in self.queue)},
            "weight_map": dict(sorted(weight_map.items())),
        }
        with open(self.folder / "model.safetensors.index.json", "w") as f:
            json.dump(index, f, indent=4)

    def abort(self) -> None:
        self._close_file()


def safetensors_header(specs: Sequence[Spec], metadata: Optional[Dict[str, str]] = None) -> bytes:
    """Length prefix plus JSON header, padded with spaces to 8 bytes as the format asks."""
    header: Dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for spec in specs:
        name, dtype, shape = spec
        header[name] = {
            "dtype": SAFETENSORS_DTYPES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes(spec)],
        }
        offset += nbytes(spec)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text
