"""Prompt caches kept on disk, so that an evicted conversation, or one from before a restart,
resumes without prefilling its prompt again.

A folder holds one subfolder per model (named by `model_fingerprint`), so another model's caches
are never even read. Each entry is mlx-lm's prompt-cache file (`<key>.safetensors`) plus a small
`<key>.json` with the token ids it holds; the folder is bounded in bytes, least recently used
entries going first. A file that does not load, or does not match the model, is deleted and
ignored: the prompt is prefilled as if it were not there.
"""

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.models.cache import QuantizedKVCache, load_prompt_cache, save_prompt_cache

from .kv_cache import held_prefix
from .models.diffusion import linear_shape
from .prompt_cache import PromptCache, common_prefix_length

log = logging.getLogger(__name__)

FORMAT = "orthrus-mlx prompt cache 1"


def model_fingerprint(model) -> str:
    """A short hash that tells models apart: every parameter's name, shape and dtype, plus the
    values of the small ones (norms, biases) and of the embedding's first rows, which any
    fine-tune or re-quantization changes."""
    digest = hashlib.sha256()
    for name, value in sorted(tree_flatten(model.parameters()), key=lambda item: item[0]):
        digest.update(f"{name}:{tuple(value.shape)}:{value.dtype};".encode())
        sample = value if value.size <= 4096 else value.reshape(-1)[:4096]
        digest.update(np.array(sample.astype(mx.float32)).tobytes())
    return digest.hexdigest()[:32]


def held_only(pc: PromptCache) -> List[Any]:
    """`pc`'s caches cut to the positions they hold (a KVCache grows in steps of 256); None
    entries for caches that cannot be cut (rotating ones), which are not kept on disk."""
    return [held_prefix(c, c.offset) for c in pc.cache]


class DiskTier:
    """The on-disk level of a `PromptCachePool`: `save` a cache as it leaves memory, `find` the
    entry sharing the longest prefix with a prompt, `load` it back."""

    def __init__(self, folder: os.PathLike, model, max_bytes: int):
        if max_bytes < 1:
            raise ValueError(f"The disk prompt cache's byte bound must be >= 1, got {max_bytes}")
        self.model, self.max_bytes = model, max_bytes
        self.fingerprint = model_fingerprint(model)
        self.folder = Path(folder).expanduser() / self.fingerprint
        self.folder.mkdir(parents=True, exist_ok=True)
        self.entries: Dict[str, List[int]] = {}  # key -> token ids
        self._scan()

    def _scan(self) -> None:
        for index in self.folder.glob("*.json"):
            key = index.stem
            try:
                record = json.loads(index.read_text())
                tokens = record["tokens"]
                if record.get("format") != FORMAT or record.get("model") != self.fingerprint:
                    raise ValueError("written for another model or format")
                if not isinstance(tokens, list) or not all(type(t) is int and t >= 0 for t in tokens):
                    raise ValueError("bad token ids")
                if not (self.folder / f"{key}.safetensors").is_file():
                    raise ValueError("its cache file is missing")
            except (OSError, ValueError, KeyError, TypeError) as e:
                log.warning("Dropping the prompt cache entry %s: %s", key, e)
                self._delete(key)
                continue
            self.entries[key] = tokens
        for orphan in self.folder.glob("*.safetensors"):
            if orphan.stem not in self.entries:
                orphan.unlink(missing_ok=True)

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def nbytes(self) -> int:
        return sum(self._size(key) for key in self.entries)

    def find(self, prompt: Sequence[int]) -> Tuple[Optional[str], int]:
        """The entry sharing the longest prefix with `prompt`, and that length."""
        best, shared = None, 0
        for key, tokens in self.entries.items():
            n = common_prefix_length(tokens, prompt)
            if n > shared:
                best, shared = key, n
        return best, shared

    def save(self, pc: PromptCache) -> None:
        """Write `pc` (unless an entry holds it already), drop entries it extends, then
        the least recently used entries until the folder fits."""
        tokens = list(pc.tokens)
        if not tokens or any(common_prefix_length(t, tokens) == len(tokens) for t in self.entries.values()):
            return
        held = held_only(pc)
        if None in held:
            return
        key = hashlib.sha256(json.dumps(tokens).encode()).hexdigest()[:32]
        temporary = self.folder / f"{key}.partial.safetensors"
        try:
            save_prompt_cache(str(temporary), held, {"format": FORMAT, "model": self.fingerprint})
            os.replace(temporary, self.folder / f"{key}.safetensors")
            index = self.folder / f"{key}.json.partial"
            index.write_text(json.dumps({"format": FORMAT, "model": self.fingerprint, "tokens": tokens}))
            os.replace(index, self.folder / f"{key}.json")
        except OSError as e:  # a full disk loses the entry, not the request
            log.warning("Could not save a prompt cache to %s: %s", self.folder, e)
            temporary.unlink(missing_ok=True)
            self._delete(key)
            return
        for other, held in list(self.entries.items()):
            if common_prefix_length(held, tokens) == len(held):
                self._delete(other)
        self.entries[key] = tokens
        self._fit()

    def load(self, key: str) -> Optional[PromptCache]:
        """Entry `key` as a `PromptCache`, or None (the entry deleted) if it is unusable."""
        path = self.folder / f"{key}.safetensors"
        tokens = self.entries[key]
        try:
            cache, metadata = load_prompt_cache(str(path), return_metadata=True)
            self._check(cache, metadata, len(tokens))
            mx.eval([(c.keys, c.values) for c in cache])
        except Exception as e:  # any failure of a file on disk means: prefill instead
            log.warning("Dropping the unusable prompt cache file %s: %s", path, e)
            self._delete(key)
            return None
        os.utime(path)  # most recently used
        pc = PromptCache(self.model)
        pc.cache, pc.tokens = cache, list(tokens)
        return pc

    def _check(self, cache, metadata, length: int) -> None:
        if metadata.get("model") != self.fingerprint:
            raise ValueError("written for another model")
        expected = self.model.make_cache()
        if len(cache) != len(expected):
            raise ValueError(f"{len(cache)} layers, the model has {len(expected)}")
        for c, e, layer in zip(cache, expected, self.model.layers):
            attention = layer.self_attn
            head_dim = linear_shape(attention.k_proj)[0] // attention.n_kv_heads
            shape = (1, attention.n_kv_heads, length, head_dim)
            if type(c) not in (type(e), QuantizedKVCache) or c.offset != length or c.keys is None:
                raise ValueError("its caches do not match the model's")
            if isinstance(c, QuantizedKVCache):  # packed: the last dimension is not head_dim
                if tuple(c.keys[0].shape[:3]) != shape[:3] or tuple(c.values[0].shape[:3]) != shape[:3]:
                    raise ValueError(f"quantized keys of shape {tuple(c.keys[0].shape)}, expected {shape[:3]}")
            elif tuple(c.keys.shape) != shape or tuple(c.values.shape) != shape:
                raise ValueError(f"keys of shape {tuple(c.keys.shape)}, expected {shape}")

    def _size(self, key: str) -> int:
        try:
            return (self.folder / f"{key}.safetensors").stat().st_size
        except OSError:
            return 0

    def _fit(self) -> None:
        def last_used(key: str) -> float:
            try:
                return (self.folder / f"{key}.safetensors").stat().st_mtime
            except OSError:
                return 0.0

        for key in sorted(self.entries, key=last_used):
            if self.nbytes <= self.max_bytes:
                break
            self._delete(key)

    def _delete(self, key: str) -> None:
        self.entries.pop(key, None)
        for name in (f"{key}.safetensors", f"{key}.json"):
            (self.folder / name).unlink(missing_ok=True)
