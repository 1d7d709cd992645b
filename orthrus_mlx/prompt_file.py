"""Prompt-cache files: a long document prefilled once, its KV cache saved, reused by later runs.

The file is mlx-lm's (`save_prompt_cache` / `load_prompt_cache`: safetensors with the cache's
classes and metadata; mlx-lm's own `model` and `tokenizer_config` entries are written too). We
add the token ids the cache holds, the document's text, and a fingerprint of the base model:
keys and values are a function of the base's weights, so a file made by another model (or
another dtype or quantization of it) would silently give another model's answers, and is refused.
"""

import json
from dataclasses import dataclass
from typing import Any, List, Optional, Sequence

from mlx_lm.models.cache import QuantizedKVCache, load_prompt_cache, save_prompt_cache

from .prompt_cache import PromptCache
from .prompt_disk import model_fingerprint

FORMAT = "orthrus-mlx prompt file 1"


def save(path: str, cache: List[Any], tokens: Sequence[int], text: str, model: Any, model_name: str = "") -> None:
    metadata = {
        "model": model_name,
        "tokenizer_config": "{}",
        "orthrus_format": FORMAT,
        "orthrus_model": model_fingerprint(model),
        "orthrus_tokens": json.dumps([int(t) for t in tokens]),
        "orthrus_text": text,
    }
    save_prompt_cache(path, cache, metadata)


@dataclass
class PromptFile:
    """A loaded file: the cache, the ids of the tokens it holds, and the text they came from."""

    cache: List[Any]
    tokens: List[int]
    text: str

    def continue_with(self, model: Any, prompt: Sequence[int]) -> List[int]:
        """Trim the cache to what it shares with the whole `prompt`; the tokens left to prefill."""
        held = PromptCache(model)
        held.cache, held.tokens = self.cache, list(self.tokens)
        return held.prepare(prompt)


def load(path: str, model: Any, kv_bits: Optional[int] = None, kv_group_size: Optional[int] = None) -> PromptFile:
    """The file at `path`, checked against `model` and the cache flags; ValueError if it does not fit."""
    try:
        cache, metadata = load_prompt_cache(str(path), return_metadata=True)
    except (ValueError, RuntimeError, KeyError) as e:
        raise ValueError(f"{path} is not a prompt cache file ({e})") from e
    if metadata.get("orthrus_format") != FORMAT:
        raise ValueError(f"{path} was not written by `orthrus-mlx cache-prompt` (no token ids or model fingerprint)")
    if metadata.get("orthrus_model") != model_fingerprint(model):
        raise ValueError(
            f"{path} was made for another model (or another dtype of it): its keys and values do not "
            "fit this one. Make it again with `orthrus-mlx cache-prompt` and this --model."
        )
    if len(cache) != len(model.layers):
        raise ValueError(f"{path} holds {len(cache)} layers' caches; the model has {len(model.layers)}")
    if isinstance(cache[0], QuantizedKVCache):  # as mlx-lm: the flags may not ask for another quantization
        if kv_bits is not None and kv_bits != cache[0].bits:
            raise ValueError(f"--kv-bits {kv_bits} does not match the {cache[0].bits}-bit cache in {path}")
        if kv_group_size is not None and kv_group_size != cache[0].group_size:
            raise ValueError(f"--kv-group-size {kv_group_size} does not match the cache in {path} "
                             f"({cache[0].group_size})")
    return PromptFile(cache, json.loads(metadata["orthrus_tokens"]), metadata["orthrus_text"])
