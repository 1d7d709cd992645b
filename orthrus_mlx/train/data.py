"""Token streams of the corpus and random training windows over them."""

from __future__ import annotations

from pathlib import Path
from typing import List

import numpy as np
import torch
from tokenizers import Tokenizer

from .corpus import Document
from .tokenizer import EOS


def encode_documents(tok: Tokenizer, docs: List[Document]) -> np.ndarray:
    """One stream: each document's tokens followed by EOS."""
    eos = tok.token_to_id(EOS)
    parts = []
    for enc in tok.encode_batch([d.text for d in docs]):
        parts.append(np.asarray(enc.ids + [eos], dtype=np.uint16))
    return np.concatenate(parts)


def save_stream(stream: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, stream)


def load_stream(path: Path) -> np.ndarray:
    return np.load(path)


def random_windows(
    stream: np.ndarray, batch: int, length: int, gen: torch.Generator
) -> torch.Tensor:
    """[batch, length] windows at uniformly random offsets."""
    starts = torch.randint(0, len(stream) - length, (batch,), generator=gen).tolist()
    rows = [stream[s : s + length].astype(np.int64) for s in starts]
    return torch.from_numpy(np.stack(rows))


def fixed_windows(stream: np.ndarray, count: int, length: int) -> torch.Tensor:
    """[count, length] evenly spaced windows: a deterministic evaluation set."""
    stride = max((len(stream) - length) // count, 1)
    rows = [stream[i * stride : i * stride + length].astype(np.int64) for i in range(count)]
    return torch.from_numpy(np.stack(rows))
