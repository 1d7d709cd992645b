"""Tokens per step on the shipped tiny model with and without a random LoRA adapter.

The adapter changes the AR view only; the drafter was trained on the base, so drafts are
accepted less where the adapter moved the base. Greedy, block 16, 20 held-out prompts.

    python benchmarks/lora_acceptance.py [--rank 4] [--scale 4.0] [--std 0.1]
"""

import argparse
import json
import tempfile
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.models import qwen3
from mlx_lm.tuner.utils import linear_to_lora_layers

from orthrus_mlx import load, mlx_generate
from orthrus_mlx.core.step import DecodeStats
from orthrus_mlx.loader import DEFAULT_MODEL


def random_adapter(folder: Path, rank: int, scale: float, std: float, num_layers: int = 2) -> Path:
    config = {"fine_tune_type": "lora", "num_layers": num_layers,
              "lora_parameters": {"rank": rank, "scale": scale, "dropout": 0.0}}
    base = qwen3.Model(qwen3.ModelArgs.from_dict(json.loads((DEFAULT_MODEL / "config.json").read_text())))
    linear_to_lora_layers(base, num_layers, config["lora_parameters"])
    rng = np.random.default_rng(3)
    lora = {name: mx.array(rng.normal(0, std, v.shape).astype(np.float32))
            for name, v in tree_flatten(base.parameters()) if name.endswith(("lora_a", "lora_b"))}
    mx.save_safetensors(str(folder / "adapters.safetensors"), lora)
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--scale", type=float, default=4.0)
    parser.add_argument("--std", type=float, default=0.1)
    args = parser.parse_args()
    prompts = [p["text"] for p in json.loads((DEFAULT_MODEL / "heldout_prompts.json").read_text())][:20]
    with tempfile.TemporaryDirectory() as tmp:
        adapter = random_adapter(Path(tmp), args.rank, args.scale, args.std)
        for name, kwargs in [("base", {}), ("random LoRA", {"adapter_path": adapter})]:
            model, tokenizer = load(DEFAULT_MODEL, **kwargs)
            stats = DecodeStats()
            for prompt in prompts:
                list(mlx_generate(model, tokenizer.encode(prompt), None, 128, block_size=16, stats=stats))
            print(f"{name}: {stats.mean_tokens_per_step:.2f} tokens/step ({stats.steps} steps)")


if __name__ == "__main__":
    main()
