"""The shipped trained checkpoint drafts for real on held-out text, and stays exact.

Greedy and deterministic: the held-out prompts are stored as text next to the checkpoint, so the
numbers do not depend on the local Python's standard library.
"""

import json
import os
from pathlib import Path

import pytest

import orthrus_mlx
from orthrus_mlx import load, mlx_generate
from orthrus_mlx.core.step import DecodeStats

ASSET = Path(os.environ.get("ORTHRUS_TINY", Path(orthrus_mlx.__file__).parent / "assets" / "orthrus-tiny"))
MAX_TOKENS = 64
N_PROMPTS = 8  # the first prompts of the file: keeps the test to seconds
# A little below the measured mean tokens/step (see the model card), so real regressions fail.
FLOOR = {16: 2.6}  # measured 2.85 with the MLX engine on these 8 prompts
MAX_NLL = 4.6  # nats per token on the held-out prompts (untrained: about 7.6)


@pytest.fixture(scope="module")
def shipped():
    model, tokenizer = load(str(ASSET))
    prompts = json.loads((ASSET / "heldout_prompts.json").read_text())[:N_PROMPTS]
    ids = [tokenizer.encode(p["text"], add_special_tokens=False) for p in prompts]
    return model, tokenizer, ids


def test_shipped_folder_is_small_and_complete():
    names = {p.name for p in ASSET.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
            "tokenizer_config.json", "README.md", "heldout_prompts.json"} <= names
    assert sum(p.stat().st_size for p in ASSET.iterdir()) < 9_000_000
    config = json.loads((ASSET / "config.json").read_text())
    assert config["architectures"] == ["OrthrusLM"] and config["model_type"] == "qwen3"
    tok_config = json.loads((ASSET / "tokenizer_config.json").read_text())
    assert tok_config["mask_token"] == "<|mask|>" and "<|im_start|>" in tok_config["chat_template"]


def test_mask_and_eos_tokens(shipped):
    model, tokenizer, _ = shipped
    assert tokenizer.convert_tokens_to_ids("<|mask|>") == model.args.mask_token_id
    assert tokenizer.eos_token_id == json.loads((ASSET / "config.json").read_text())["eos_token_id"]


@pytest.mark.parametrize("block_size", sorted(FLOOR))
def test_drafting_on_heldout_prompts_is_fast_and_exact(shipped, block_size):
    model, tokenizer, prompts = shipped
    stats = DecodeStats()
    for ids in prompts:
        step = DecodeStats()
        out = list(mlx_generate(model, ids, tokenizer.eos_token_id, max_tokens=MAX_TOKENS,
                                temperature=0.0, use_diffusion=True, stats=step,
                                block_size=block_size))
        ar = list(mlx_generate(model, ids, tokenizer.eos_token_id, max_tokens=MAX_TOKENS,
                               temperature=0.0, use_diffusion=False))
        assert out == ar
        stats.tokens_per_step += step.tokens_per_step
    assert stats.mean_tokens_per_step > FLOOR[block_size], stats.histogram()


def test_base_model_is_trained(shipped):
    """Guards the floor above: a degenerate model that repeats itself also drafts 'well'."""
    import mlx.core as mx

    model, _, prompts = shipped
    total, count = 0.0, 0
    for ids in prompts:
        logits = model(mx.array([ids]))[0, :-1].astype(mx.float32)
        logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        targets = mx.array(ids[1:])
        total += -mx.take_along_axis(logp, targets[:, None], axis=-1).sum().item()
        count += len(ids) - 1
    assert total / count < MAX_NLL
