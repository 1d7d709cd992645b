"""A fixed set of held-out prompts (plain text cut at line boundaries) for tests and benchmarks."""

from __future__ import annotations

from typing import List

from .corpus import Document


def _doc_prompts(doc: Document, per_doc: int, min_chars: int, max_chars: int) -> List[dict]:
    lines = doc.text.splitlines(keepends=True)
    found = []
    for k in range(per_doc):
        start = (len(lines) * (2 * k + 1)) // (2 * per_doc)
        text = ""
        for line in lines[start:]:
            if len(text) + len(line) > max_chars:
                break
            text += line
        if len(text) >= min_chars:
            found.append({"source": f"{doc.path}:{start + 1}", "text": text})
    return found


def heldout_prompts(docs: List[Document], count: int = 32, per_doc: int = 4,
                    min_chars: int = 160, max_chars: int = 320) -> List[dict]:
    """Up to `count` prompts of whole lines (min..max chars), taken round-robin over documents."""
    per = [_doc_prompts(d, per_doc, min_chars, max_chars) for d in docs]
    prompts = []
    for k in range(per_doc):
        prompts += [p[k] for p in per if k < len(p)]
    return prompts[:count]
