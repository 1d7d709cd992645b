"""Random Orthrus checkpoints (Qwen3 or Llama) in Hugging Face layout, for tests and benchmarks (no downloads)."""

import json
from pathlib import Path
from typing import Any, Dict, Optional, Union

import mlx.core as mx
import numpy as np

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|mask|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_config(**overrides: Any) -> Dict[str, Any]:
    """A small Orthrus config with GQA; vocab 300 covers the byte tokenizer below."""
    config = {
        "architectures": ["OrthrusLM"],
        "model_type": "qwen3",
        "vocab_size": 300,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "max_position_embeddings": 512,
        "tie_word_embeddings": True,
        "torch_dtype": "float32",
        "block_size": 8,
        "mask_token_id": 259,
        "eos_token_id": 256,
    }
    config.update(overrides)
    return config


def tiny_llama_config(**overrides: Any) -> Dict[str, Any]:
    """The same small Orthrus on Llama: no q/k norms, Llama's rope theta default."""
    return tiny_config(**{"model_type": "llama", "rope_theta": 500000.0, **overrides})


def has_qk_norms(config: Dict[str, Any]) -> bool:
    return config["model_type"] == "qwen3"


def random_weights(config: Dict[str, Any], seed: int = 0, scale: float = 0.3) -> Dict[str, np.ndarray]:
    """Float32 tensors under the checkpoint's names; large enough to give peaked logits."""
    rng = np.random.default_rng(seed)
    d, hd = config["hidden_size"], config["head_dim"]
    nq, nkv = config["num_attention_heads"], config["num_key_value_heads"]
    ff, vocab = config["intermediate_size"], config["vocab_size"]
    diffusion = config.get("block_size") is not None and config.get("mask_token_id") is not None

    def matrix(rows: int, cols: int) -> np.ndarray:
        return (rng.standard_normal((rows, cols)) * scale / np.sqrt(cols) * 4).astype(np.float32)

    def norm(n: int) -> np.ndarray:
        return (1.0 + 0.2 * rng.standard_normal(n)).astype(np.float32)

    w = {"model.embed_tokens.weight": matrix(vocab, d), "model.norm.weight": norm(d)}
    if not config["tie_word_embeddings"]:
        w["lm_head.weight"] = matrix(vocab, d)
    shapes = {"q_proj": (nq * hd, d), "k_proj": (nkv * hd, d), "v_proj": (nkv * hd, d), "o_proj": (d, nq * hd)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        views = ["", "_diff"] if diffusion else [""]
        for view in views:
            for name, shape in shapes.items():
                w[f"{p}self_attn.{name}{view}.weight"] = matrix(*shape)
            if has_qk_norms(config):
                w[f"{p}self_attn.q_norm{view}.weight"] = norm(hd)
                w[f"{p}self_attn.k_norm{view}.weight"] = norm(hd)
        w[f"{p}mlp.gate_proj.weight"] = matrix(ff, d)
        w[f"{p}mlp.up_proj.weight"] = matrix(ff, d)
        w[f"{p}mlp.down_proj.weight"] = matrix(d, ff)
        w[f"{p}input_layernorm.weight"] = norm(d)
        w[f"{p}post_attention_layernorm.weight"] = norm(d)
    return w


def write_byte_tokenizer(path: Path) -> None:
    """A byte-level BPE tokenizer with no merges: ids 0-255 are bytes, then the specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = ByteLevel.alphabet()
    byte_to_char = sorted(alphabet, key=lambda c: _byte_of(c))
    vocab = {c: i for i, c in enumerate(byte_to_char)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIAL_TOKENS)
    tok.save(str(path / "tokenizer.json"))
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "bos_token": None,
        "mask_token": "<|mask|>",
        "chat_template": CHAT_TEMPLATE,
    }
    with open(path / "tokenizer_config.json", "w") as f:
        json.dump(tokenizer_config, f, indent=2)


def _byte_of(char: str) -> int:
    # GPT-2's byte-to-unicode map: printable bytes map to themselves, the rest to 256+.
    printable = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    others = [b for b in range(256) if b not in printable]
    code = ord(char)
    return code if code in printable else others[code - 256]


def save_checkpoint(
    path: Union[str, Path],
    config: Dict[str, Any],
    weights: Dict[str, np.ndarray],
    dtype: str = "float32",
    shards: int = 1,
    tokenizer: bool = True,
) -> Path:
    """Write config, generation config, (sharded) safetensors and a tokenizer, HF layout."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = dict(config, torch_dtype=dtype)
    with open(path / "config.json", "w") as f:
        json.dump(config, f, indent=2)
    with open(path / "generation_config.json", "w") as f:
        json.dump({"eos_token_id": config.get("eos_token_id")}, f)
    mx_dtype = getattr(mx, dtype)
    arrays = {k: mx.array(v).astype(mx_dtype) for k, v in weights.items()}
    names = sorted(arrays)
    if shards == 1:
        mx.save_safetensors(str(path / "model.safetensors"), arrays, metadata={"format": "pt"})
    else:
        weight_map = {}
        for s in range(shards):
            file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
            part = {k: arrays[k] for k in names[s::shards]}
            mx.save_safetensors(str(path / file), part, metadata={"format": "pt"})
            weight_map.update({k: file for k in part})
        with open(path / "model.safetensors.index.json", "w") as f:
            json.dump({"metadata": {}, "weight_map": weight_map}, f, indent=2)
    if tokenizer:
        write_byte_tokenizer(path)
    return path


def random_checkpoint(
    path: Union[str, Path],
    config: Optional[Dict[str, Any]] = None,
    seed: int = 0,
    dtype: str = "float32",
    shards: int = 1,
    tokenizer: bool = True,
) -> Path:
    """A random Orthrus (or, without block_size/mask_token_id, plain Qwen3/Llama) checkpoint."""
    config = config or tiny_config()
    return save_checkpoint(path, config, random_weights(config, seed), dtype, shards, tokenizer)

