"""A LoRA adapter in mlx-lm's format changes the AR view only, and the output is exactly the
adapted model's: mlx-lm's own loading and decoding of the same adapter is the reference."""

import argparse
import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.generate import generate_step
from mlx_lm.models import qwen3
from mlx_lm.tuner.utils import linear_to_lora_layers
from mlx_lm.tuner.utils import load_adapters as mlx_lm_load_adapters

from orthrus_mlx import load, load_model, mlx_generate
from orthrus_mlx.cli import generate as generate_command
from orthrus_mlx.cli.flags import load_from_args
from orthrus_mlx.loader import DEFAULT_MODEL

TINY = DEFAULT_MODEL
# No "keys": mlx-lm then wraps every linear layer of the last num_layers layers, *_proj_diff included.
LORA = {"fine_tune_type": "lora", "num_layers": 2, "lora_parameters": {"rank": 4, "scale": 4.0, "dropout": 0.0}}
PROMPT = [50, 81, 310, 1012, 270, 271, 690]


def mlx_lm_base():
    """mlx-lm's own Qwen3 with the shipped model's AR weights."""
    base = qwen3.Model(qwen3.ModelArgs.from_dict(json.loads((TINY / "config.json").read_text())))
    weights = mx.load(str(TINY / "model.safetensors"))
    base.load_weights([(k, v) for k, v in weights.items() if "_diff" not in k])
    return base


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    """A random adapter folder, made the way `mlx_lm.lora` saves one."""
    path = tmp_path_factory.mktemp("adapter")
    model = mlx_lm_base()
    linear_to_lora_layers(model, LORA["num_layers"], LORA["lora_parameters"])
    rng = np.random.default_rng(3)
    lora = {
        name: mx.array(rng.normal(0, 0.1, value.shape).astype(np.float32))
        for name, value in tree_flatten(model.parameters())
        if name.endswith(("lora_a", "lora_b"))
    }
    mx.save_safetensors(str(path / "adapters.safetensors"), lora)
    (path / "adapter_config.json").write_text(json.dumps(LORA))
    return path


def mlx_lm_greedy(model, max_tokens):
    return [int(t) for t, _ in generate_step(mx.array(PROMPT), model, max_tokens=max_tokens)]


def test_output_is_mlx_lms_adapted_model(adapter):
    reference = mlx_lm_load_adapters(mlx_lm_base(), str(adapter))
    reference.eval()
    model, _ = load_model(TINY, adapter_path=adapter)
    plain, _ = load_model(TINY)
    want = mlx_lm_greedy(reference, 40)
    assert want != mlx_lm_greedy(mlx_lm_base(), 40), "the adapter changed nothing: the test could not fail"
    for block_size in (4, 16):
        assert list(mlx_generate(model, PROMPT, [], 40, block_size=block_size)) == want
    # The AR view is adapted, the diffusion view is the checkpoint's, module for module.
    attn, plain_attn = model.layers[-1].self_attn, plain.layers[-1].self_attn
    assert type(attn.q_proj).__name__ == "LoRALinear"
    for name in ("q_proj_diff", "k_proj_diff", "v_proj_diff", "o_proj_diff"):
        assert type(getattr(attn, name)) is nn.Linear, name
        assert mx.array_equal(getattr(attn, name).weight, getattr(plain_attn, name).weight)
    assert type(model.layers[-1].mlp.up_proj).__name__ == "LoRALinear"  # the shared MLP belongs to both


def test_adapter_path_flag_and_bad_folders(adapter, tmp_path):
    parser = argparse.ArgumentParser()
    generate_command.add_arguments(parser)
    model, _ = load_from_args(parser.parse_args(["--model", str(TINY), "--adapter-path", str(adapter)]))
    assert type(model.layers[-1].self_attn.v_proj).__name__ == "LoRALinear"
    with pytest.raises(FileNotFoundError, match="adapter folder"):
        load(TINY, adapter_path=tmp_path)
