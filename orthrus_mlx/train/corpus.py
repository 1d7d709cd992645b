"""The training corpus: the running interpreter's standard library sources (PSF License).

Files are split into train / held-out by a hash of their path relative to the stdlib root, so the
split is the same on every machine with the same Python version.
"""

from __future__ import annotations

import hashlib
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import List

SKIP_DIRS = {"test", "tests", "idlelib", "lib2to3", "site-packages", "dist-packages",
             "turtledemo", "pydoc_data", "encodings", "ensurepip", "__pycache__"}
MAX_FILE_BYTES = 200_000
HELDOUT_PERCENT = 8


@dataclass
class Document:
    path: str  # relative to the stdlib root, "/"-separated
    text: str


def python_version() -> str:
    return sys.version.split()[0]


def is_heldout(rel_path: str) -> bool:
    digest = hashlib.sha256(rel_path.encode()).digest()
    return int.from_bytes(digest[:4], "little") % 100 < HELDOUT_PERCENT


def stdlib_documents(root: str | None = None) -> List[Document]:
    """All usable *.py files of the stdlib, sorted by path."""
    base = Path(root or sysconfig.get_paths()["stdlib"])
    docs = []
    for path in sorted(base.rglob("*.py")):
        rel = path.relative_to(base)
        if any(part in SKIP_DIRS for part in rel.parts[:-1]):
            continue
        if path.stat().st_size > MAX_FILE_BYTES:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if text.strip():
            docs.append(Document(rel.as_posix(), text))
    return docs


def split_documents(docs: List[Document]) -> tuple[List[Document], List[Document]]:
    train = [d for d in docs if not is_heldout(d.path)]
    heldout = [d for d in docs if is_heldout(d.path)]
    return train, heldout
