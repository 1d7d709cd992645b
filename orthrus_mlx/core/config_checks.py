"""The config.json fields a model is built from, each checked for its type and range.

A string where an integer belongs, a zero size or a vocabulary of 10^12 would otherwise end in
a traceback deep inside the model code, an allocation of gigabytes, or a model that runs but
answers wrongly. Each failure is one line naming the file and the field.
"""

import dataclasses
import math
from pathlib import Path
from typing import Any, Dict, Iterable, Optional

MAX_SIZE = 2**31  # the largest dimension MLX (int32 shapes) can build
# Sizes: integers in [1, MAX_SIZE) wherever they are given.
SIZE_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "max_position_embeddings",
)


def is_int(value: Any) -> bool:
    """An integer, and not a bool (JSON `true` must not pass for 1)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return (is_int(value) or isinstance(value, float)) and math.isfinite(value)


def shown(value: Any, limit: int = 80) -> str:
    """A value as a one-line message shows it: its repr, cut short."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def named(name: Any) -> str:
    """A name (of a tensor, a file) as is when printable, else as a value."""
    return name if isinstance(name, str) and name.isprintable() and len(name) <= 200 else shown(name)


def check_config(config: Dict[str, Any], file: Path) -> None:
    """Type and range of every field given; which fields are required is the model's business."""

    def refuse(field: str, expected: str) -> None:
        raise ValueError(f"{file}: {field} must be {expected}, got {shown(config[field])}")

    for field in SIZE_FIELDS:
        value = config.get(field)
        if value is not None and not (is_int(value) and 1 <= value < MAX_SIZE):
            refuse(field, "an integer in [1, 2**31)")
    for field in ("rope_theta", "rms_norm_eps"):
        value = config.get(field)
        if value is not None and not (is_number(value) and value > 0):
            refuse(field, "a finite number > 0")
    for field in ("rope_scaling", "rope_parameters", "quantization"):
        if config.get(field) is not None and not isinstance(config[field], dict):
            refuse(field, "an object or null")
    theta = (config.get("rope_parameters") or {}).get("rope_theta")
    if theta is not None and not (is_number(theta) and theta > 0):
        raise ValueError(f"{file}: rope_parameters.rope_theta must be a finite number > 0, got {theta!r}")
    for field in ("bits", "group_size"):
        value = (config.get("quantization") or {}).get(field)
        if value is not None and not (is_int(value) and value > 0):
            raise ValueError(f"{file}: quantization.{field} must be an integer > 0, got {shown(value)}")
    if config.get("tie_word_embeddings") is not None and not isinstance(config["tie_word_embeddings"], bool):
        refuse("tie_word_embeddings", "true or false")
    block = config.get("block_size")
    if block is not None and not (is_int(block) and 2 <= block < MAX_SIZE):
        refuse("block_size", ">= 2 (an integer)")
    vocab = config.get("vocab_size")
    mask = config.get("mask_token_id")
    if mask is not None and not is_int(mask):
        refuse("mask_token_id", "an integer token id")
    if mask is not None and vocab is not None and not 0 <= mask < vocab:
        raise ValueError(f"{file}: mask_token_id {mask} is outside the vocabulary [0, {vocab})")
    check_token_ids(config, "eos_token_id", file, vocab)
    check_heads(config, file)


def check_heads(config: Dict[str, Any], file: Path) -> None:
    """Head counts and widths that the attention's reshapes and RoPE can use."""
    heads, kv_heads = config.get("num_attention_heads"), config.get("num_key_value_heads")
    if heads is not None and kv_heads is not None and heads % kv_heads:
        raise ValueError(
            f"{file}: num_attention_heads ({heads}) must be a multiple of num_key_value_heads ({kv_heads})"
        )
    head_dim, hidden = config.get("head_dim"), config.get("hidden_size")
    if head_dim is None and heads is not None and hidden is not None:
        if hidden % heads:
            raise ValueError(
                f"{file}: hidden_size ({hidden}) must be a multiple of num_attention_heads ({heads}) "
                "when head_dim is not given"
            )
        head_dim = hidden // heads
    if head_dim is not None and head_dim % 2:
        raise ValueError(f"{file}: head_dim must be even (RoPE turns pairs of dimensions), got {head_dim}")


def check_token_ids(config: Dict[str, Any], field: str, file: Path, vocab: Optional[int]) -> None:
    """A token id or a list of them, each inside the vocabulary."""
    value = config.get(field)
    if value is None:
        return
    ids = value if isinstance(value, list) else [value]
    top = vocab if is_int(vocab) else float("inf")
    if not all(is_int(i) and 0 <= i < top for i in ids):
        where = f"[0, {vocab})" if is_int(vocab) else ">= 0"
        raise ValueError(
            f"{file}: {field} must be a token id or a list of token ids in {where}, got {shown(value)}"
        )


def check_required(
    config: Dict[str, Any], args_class: Any, file: Path, what: str, derived: Iterable[str] = ()
) -> None:
    """The fields `args_class` (a dataclass) has no default for must be given, and not null,
    but for those its `from_dict` derives from others (`derived`)."""
    required = [
        f.name
        for f in dataclasses.fields(args_class)
        if f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
        and f.name not in derived
    ]
    missing = [name for name in required if config.get(name) is None]
    if missing:
        raise ValueError(f"{file} lacks {what} fields: {missing}")
