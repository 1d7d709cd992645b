"""Fails loudly, with the name of the missing piece, if an mlx-lm API we build on changes."""

import dataclasses
import inspect

from mlx_lm.generate import GenerationResponse
from mlx_lm.models import qwen3
from mlx_lm.models.cache import KVCache
from mlx_lm.sample_utils import apply_top_k, apply_top_p  # noqa: F401
from mlx_lm.tokenizer_utils import TokenizerWrapper
from mlx_lm.utils import load_model, load_tokenizer

from orthrus_mlx.testing import tiny_config


def test_qwen3_classes_we_subclass():
    args = qwen3.ModelArgs.from_dict(tiny_config())
    attention = qwen3.Attention(args)
    for name in ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm", "rope", "n_heads", "n_kv_heads", "scale"):
        assert hasattr(attention, name), name
    block = qwen3.TransformerBlock(args)
    for name in ("self_attn", "mlp", "input_layernorm", "post_attention_layernorm"):
        assert hasattr(block, name), name
    model = qwen3.Model(args)
    assert hasattr(model.model, "embed_tokens") and hasattr(model.model, "norm")
    assert hasattr(model.model.embed_tokens, "as_linear")


def test_cache_loader_and_response_apis():
    cache = KVCache()
    for name in ("update_and_fetch", "trim", "offset", "state"):
        assert hasattr(cache, name), name
    assert "get_model_classes" in inspect.signature(load_model).parameters
    assert "eos_token_ids" in inspect.signature(load_tokenizer).parameters
    fields = {f.name for f in dataclasses.fields(GenerationResponse)}
    assert {"text", "token", "prompt_tps", "generation_tps", "peak_memory", "finish_reason"} <= fields
    assert hasattr(TokenizerWrapper, "detokenizer") and hasattr(TokenizerWrapper, "eos_token_ids")


def test_llama_classes_and_loader_helpers_we_use():
    from mlx_lm.models import llama
    from mlx_lm.tokenizer_utils import BPEStreamingDetokenizer  # noqa: F401  (GGUF tokenizers)
    from mlx_lm.utils import MODEL_REMAPPING, dequantize_model, save_config, save_model  # noqa: F401

    args = llama.ModelArgs.from_dict(tiny_config(model_type="llama"))
    attention = llama.Attention(args)
    for name in ("q_proj", "k_proj", "v_proj", "o_proj", "rope", "n_heads", "n_kv_heads", "scale"):
        assert hasattr(attention, name), name
    assert {"rope_traditional", "rope_scaling", "layer_types"} <= {f.name for f in dataclasses.fields(args)}
    model = llama.Model(args)
    assert hasattr(model.model, "embed_tokens") and hasattr(model.model, "norm") and hasattr(model, "layers")
    assert MODEL_REMAPPING.get("mistral") == "llama"


def test_server_pieces_we_reuse():
    """The server's tool calls and reasoning: mlx-lm's text state machine, tool-call formatter
    and the markers its TokenizerWrapper finds."""
    from mlx_lm.generate import TextStateMachine, make_text_state_machine  # noqa: F401
    from mlx_lm.server import ToolCallFormatter

    for name in ("split", "flush", "make_state"):
        assert hasattr(TextStateMachine, name), name
    assert list(inspect.signature(ToolCallFormatter).parameters) == ["tool_parser", "tools", "streaming"]
    for name in ("has_thinking", "rfind_think_start", "rfind_think_end", "response_initial_state", "tool_parser",
                 "tool_call_start", "tool_call_end", "has_tool_calling"):
        assert hasattr(TokenizerWrapper, name), name
