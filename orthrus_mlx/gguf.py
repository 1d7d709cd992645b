"""Read a llama-architecture GGUF file as a Hugging Face-style base: config, weights, tokenizer.

MLX reads GGUF natively (`mx.load`): quantized matrices come back as MLX affine-quantized
triplets (`weight`, `scales`, `biases`), which we keep quantized. Two things differ from a
Hugging Face checkpoint and are undone here:
- tensor names (`blk.N.attn_q` ...) are renamed to the Hugging Face ones;
- llama.cpp stores each head's Q/K rows in its interleaved rotary order; we put them back in
  the half-split order that mlx-lm's default RoPE expects. Rows are independent under per-row
  group quantization, so the permutation applies to the packed rows, scales and biases alike.
No llama.cpp is needed.
"""

from pathlib import Path
from typing import Any, Dict, List, Tuple, Union

import mlx.core as mx
import mlx.nn as nn
import numpy as np

LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
CONTROL_TOKEN = 3  # tokenizer.ggml.token_type of special (control) tokens
MAGIC = b"GGUF"


def is_gguf(path: Union[str, Path]) -> bool:
    """A file that starts with GGUF's magic bytes."""
    path = Path(path)
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        return f.read(4) == MAGIC


def hf_name(name: str) -> str:
    """`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`."""
    parts = name.split(".")
    if parts[0] == "blk":
        layer, module, suffix = parts[1], parts[2], parts[3:]
        if module not in LAYER_NAMES:
            raise ValueError(f"Unknown GGUF tensor {name}")
        return ".".join(["model", "layers", layer, LAYER_NAMES[module], *suffix])
    if parts[0] not in TOP_NAMES:
        raise ValueError(f"Unknown GGUF tensor {name}")
    return ".".join([TOP_NAMES[parts[0]], *parts[1:]])


def half_split_rows(w: mx.array, n_heads: int) -> mx.array:
    """Undo llama.cpp's per-head interleaving of Q/K rows (rows 0,1 = pair 0; HF: rows 0, d/2)."""
    rows = w.shape[0]
    head_dim = rows // n_heads
    return w.reshape(n_heads, head_dim // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def scalar(meta: Dict[str, Any], key: str) -> Any:
    value = meta[key]
    return value.item() if isinstance(value, mx.array) else value


def read_config(meta: Dict[str, Any], tensors: Dict[str, mx.array]) -> Dict[str, Any]:
    """A Hugging Face llama config from the GGUF metadata."""
    arch = scalar(meta, "general.architecture")
    if arch != "llama":
        raise ValueError(f"GGUF architecture {arch!r} is not supported (only 'llama')")

    def field(name: str, default: Any = None) -> Any:
        key = f"llama.{name}"
        return scalar(meta, key) if key in meta else default

    hidden, heads = int(field("embedding_length")), int(field("attention.head_count"))
    vocab = field("vocab_size") or len(meta["tokenizer.ggml.tokens"])
    config = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": hidden,
        "intermediate_size": int(field("feed_forward_length")),
        "num_hidden_layers": int(field("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(field("attention.head_count_kv", heads)),
        "head_dim": int(field("rope.dimension_count", hidden // heads)),
        "rms_norm_eps": float(field("attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": float(field("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(field("context_length", 2048)),
        "vocab_size": int(vocab),
        "tie_word_embeddings": "output.weight" not in tensors,
        "attention_bias": False,
        "mlp_bias": False,
    }
    if "tokenizer.ggml.bos_token_id" in meta:
        config["bos_token_id"] = int(scalar(meta, "tokenizer.ggml.bos_token_id"))
    # End of sequence and end of turn both end a generation.
    keys = [f"tokenizer.ggml.{k}_token_id" for k in ("eos", "eot")]
    eos = [int(scalar(meta, key)) for key in keys if key in meta]
    config["eos_token_id"] = sorted(set(eos))
    return config


def quantization(tensors: Dict[str, mx.array], group_size: int = 32) -> Dict[str, Any]:
    """mlx-lm's `quantization` config entry, per module, for the quantized tensors."""
    per_module: Dict[str, Any] = {}
    for name, scales in tensors.items():
        if not name.endswith(".scales"):
            continue
        module = name[: -len(".scales")]
        packed = tensors[module + ".weight"]
        columns = scales.shape[-1] * group_size
        per_module[module] = {"group_size": group_size, "bits": packed.shape[-1] * 32 // columns}
    if not per_module:
        return {}
    first = next(iter(per_module.values()))
    return {"group_size": first["group_size"], "bits": first["bits"], **per_module}


def read_gguf(path: Union[str, Path]) -> Tuple[Dict[str, Any], Dict[str, mx.array], Dict[str, Any]]:
    """(config, weights under Hugging Face names, metadata). Quantized tensors stay quantized
    (`config["quantization"]` says how); Q/K rows are in the half-split rotary order."""
    tensors, meta = mx.load(str(path), return_metadata=True)
    weights = {hf_name(k): v for k, v in tensors.items()}
    config = read_config(meta, weights)
    for layer in range(config["num_hidden_layers"]):
        for proj, heads in (("q_proj", config["num_attention_heads"]), ("k_proj", config["num_key_value_heads"])):
            for suffix in ("weight", "scales", "biases"):
                key = f"model.layers.{layer}.self_attn.{proj}.{suffix}"
                if key in weights:
                    weights[key] = half_split_rows(weights[key], heads)
    # An embedding lookup returns its scales' dtype: float32 ones keep the activations in
    # float32 from the start, as llama.cpp computes (the matmuls are float32 either way).
    for key in ("model.embed_tokens.scales", "model.embed_tokens.biases"):
        if key in weights:
            weights[key] = weights[key].astype(mx.float32)
    quant = quantization(weights)
    if quant:
        config["quantization"] = quant
    return config, weights, meta


def load_into(model: nn.Module, config: Dict[str, Any], weights: Dict[str, mx.array]) -> None:
    """Give a freshly built model (ours or mlx-lm's) the file's weights, quantized as stored."""
    quantization = config.get("quantization", {})
    if quantization:
        nn.quantize(model, class_predicate=lambda name, _: quantization.get(name, False))
    model.load_weights(list(model.sanitize(weights).items()), strict=True)


def dequantized(weights: Dict[str, mx.array], config: Dict[str, Any]) -> Dict[str, np.ndarray]:
    """Every tensor as float32 numpy (for training, or float32 inference on a CPU)."""
    quant = config.get("quantization", {})
    out = {}
    for name, w in weights.items():
        if name.endswith((".scales", ".biases")):
            continue
        module = name[: -len(".weight")]
        if module in quant:
            q = quant[module]
            # float32 scales: exactly the quantized matmul's values (float16 ones would round them)
            scales, biases = (weights[f"{module}.{k}"].astype(mx.float32) for k in ("scales", "biases"))
            w = mx.dequantize(w, scales, biases, q["group_size"], q["bits"])
        out[name] = np.array(w.astype(mx.float32))
    return out


def build_tokenizer(meta: Dict[str, Any]):
    """A Hugging Face fast tokenizer from the GGUF's byte-level BPE vocabulary and merges."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(f"GGUF tokenizer model {kind!r} is not supported (only byte-level BPE 'gpt2')")
    tokens: List[str] = meta["tokenizer.ggml.tokens"]
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    bpe = models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False)
    tokenizer = Tokenizer(bpe)
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if meta.get("tokenizer.ggml.pre") in ("smollm", "starcoder", "refact"):
        # These split digits one by one before the GPT-2 byte-level split.
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        tokenizer.pre_tokenizer = byte_level
    tokenizer.decoder = decoders.ByteLevel()
    types = np.array(meta["tokenizer.ggml.token_type"])
    tokenizer.add_special_tokens(
        [AddedToken(tokens[i], special=True, normalized=False) for i in np.flatnonzero(types == CONTROL_TOKEN)]
    )

    def token(key: str):
        full = f"tokenizer.ggml.{key}_token_id"
        return tokens[int(scalar(meta, full))] if full in meta else None

    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=token("bos"),
        eos_token=token("eos"),
        unk_token=token("unknown"),
        pad_token=token("padding"),
        chat_template=meta.get("tokenizer.chat_template"),
        clean_up_tokenization_spaces=False,
    )
