"""Write / read a model in Hugging Face layout (config.json + model.safetensors + tokenizer)."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any, Dict

import torch
from safetensors.torch import load_file, save_file

from orthrus_mlx.torch_backend.model import Model, ModelArgs


def hf_config(args: ModelArgs, eos_token_id: int) -> Dict[str, Any]:
    config = dataclasses.asdict(args)
    config.update({
        "architectures": ["OrthrusLM"],
        "model_type": "qwen3",
        "torch_dtype": "float32",
        "eos_token_id": eos_token_id,
        "bos_token_id": None,
        "hidden_act": "silu",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "rope_scaling": None,
        "use_sliding_window": False,
        "sliding_window": None,
        "initializer_range": 0.02,
    })
    return config


def save_model(model: Model, out_dir: Path, eos_token_id: int, tokenizer_dir: Path | None = None) -> None:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    config = hf_config(model.args, eos_token_id)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation = {"eos_token_id": eos_token_id, "do_sample": False}
    (out_dir / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    if tokenizer_dir is not None and Path(tokenizer_dir).resolve() != out_dir.resolve():
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(Path(tokenizer_dir) / name, out_dir / name)


def load_model(path: Path, device: str = "cpu") -> Model:
    path = Path(path)
    args = ModelArgs.from_dict(json.loads((path / "config.json").read_text()))
    model = Model(args)
    model.load_state_dict(load_file(str(path / "model.safetensors")), strict=True)
    return model.to(device).eval()
