"""The PyTorch reference model against mlx-lm's Qwen3: same weights, same AR logits in float32."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
mx = pytest.importorskip("mlx.core")
qwen3 = pytest.importorskip("mlx_lm.models.qwen3")

from orthrus_mlx.torch_backend.model import Model, ModelArgs  # noqa: E402

CONFIG = {
    "model_type": "qwen3",
    "vocab_size": 97,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "rms_norm_eps": 1e-6,
    "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
    "max_position_embeddings": 256,
    "tie_word_embeddings": True,
    "block_size": 8,
    "mask_token_id": 96,
    "some_unknown_key": 1,
}


def _random_model(tied: bool) -> Model:
    torch.manual_seed(0)
    model = Model(ModelArgs.from_dict({**CONFIG, "tie_word_embeddings": tied}))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape) * 0.2 + (1.0 if p.dim() == 1 else 0.0))
    return model.eval()


def test_from_dict_reads_nested_rope_theta():
    args = ModelArgs.from_dict(CONFIG)
    assert args.rope_theta == 10000.0 and args.block_size == 8 and args.mask_token_id == 96


def test_state_dict_keys_are_checkpoint_keys():
    keys = set(_random_model(tied=True).state_dict())
    names = ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm")
    layer = {f"model.layers.0.self_attn.{p}{s}.weight" for p in names for s in ("", "_diff")}
    layer |= {f"model.layers.0.mlp.{p}.weight" for p in ("gate_proj", "up_proj", "down_proj")}
    layer |= {f"model.layers.0.{p}.weight" for p in ("input_layernorm", "post_attention_layernorm")}
    assert {k for k in keys if k.startswith("model.layers.0.")} == layer
    assert "model.embed_tokens.weight" in keys and "model.norm.weight" in keys
    assert "lm_head.weight" not in keys
    assert "lm_head.weight" in _random_model(tied=False).state_dict()
    assert len(keys) == 2 + 2 * len(layer)


@pytest.mark.parametrize("tied", [True, False])
def test_ar_logits_match_mlx_lm_qwen3(tied):
    model = _random_model(tied)
    ids = torch.randint(0, CONFIG["vocab_size"], (2, 37), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids).numpy()

    mlx_model = qwen3.Model(qwen3.ModelArgs.from_dict({**CONFIG, "tie_word_embeddings": tied}))
    weights = [(k, mx.array(v.numpy())) for k, v in model.state_dict().items() if "_diff" not in k]
    mlx_model.load_weights(weights, strict=True)
    out = np.array(mlx_model(mx.array(ids.numpy())))
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=0)
