"""The stages that recreate the shipped checkpoint; each reads and writes files in a work dir."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from orthrus_mlx.torch_backend.model import Model, ModelArgs

from . import corpus, tokenizer
from .base import BaseTrainConfig, train_base
from .card import model_card
from .data import encode_documents, load_stream, save_stream
from .diffusion import DiffusionTrainConfig, train_diffusion
from .evaluate import evaluate_prompts
from .export import load_model, save_model
from .prompts import heldout_prompts
from .rollouts import greedy_rollouts

Log = Callable[[str], None]

TINY_ARCH = dict(hidden_size=192, intermediate_size=384, num_hidden_layers=4,
                 num_attention_heads=6, num_key_value_heads=2, head_dim=32,
                 rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=2048,
                 tie_word_embeddings=True)


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2) + "\n")


def prepare(work: Path, vocab_size: int = 2048, log: Log = print) -> dict:
    """Corpus -> split -> tokenizer -> token streams -> held-out prompts."""
    t0 = time.time()
    docs = corpus.stdlib_documents()
    train_docs, heldout_docs = corpus.split_documents(docs)
    tok = tokenizer.train_tokenizer((d.text for d in train_docs), vocab_size)
    tokenizer.save_tokenizer(tok, work / "tokenizer", max_length=TINY_ARCH["max_position_embeddings"])
    train_stream = encode_documents(tok, train_docs)
    heldout_stream = encode_documents(tok, heldout_docs)
    save_stream(train_stream, work / "train.npy")
    save_stream(heldout_stream, work / "heldout.npy")
    _write_json(work / "heldout_prompts.json", heldout_prompts(heldout_docs))
    info = {
        "python_version": corpus.python_version(),
        "train_files": len(train_docs),
        "heldout_files": len(heldout_docs),
        "heldout_paths": [d.path for d in heldout_docs],
        "train_tokens": int(len(train_stream)),
        "heldout_tokens": int(len(heldout_stream)),
        "train_chars": sum(len(d.text) for d in train_docs),
        "vocab_size": tok.get_vocab_size(),
        "seconds": time.time() - t0,
    }
    _write_json(work / "corpus_info.json", info)
    log(f"prepare: {info['train_files']} train files ({info['train_tokens']} tokens), "
        f"{info['heldout_files']} held-out ({info['heldout_tokens']} tokens)")
    return info


def base(work: Path, cfg: BaseTrainConfig, block_size: int, device: str = "cpu",
         arch: dict | None = None, log: Log = print) -> dict:
    tok = tokenizer.load_tokenizer(work / "tokenizer")
    args = ModelArgs(vocab_size=tok.get_vocab_size(), block_size=block_size,
                     mask_token_id=tok.token_to_id(tokenizer.MASK), **(arch or TINY_ARCH))
    model = Model(args)
    model.init_weights(seed=cfg.seed)
    model.to(device)
    summary = train_base(model, load_stream(work / "train.npy"), load_stream(work / "heldout.npy"),
                         cfg, device=device, log=log)
    model.copy_ar_to_diffusion()
    save_model(model, work / "base", tok.token_to_id(tokenizer.EOS), work / "tokenizer")
    summary["parameters"] = sum(p.numel() for p in model.parameters())
    summary["base_parameters"] = summary["parameters"] - sum(
        p.numel() for p in model.diffusion_parameters().values())
    _write_json(work / "base_summary.json", summary)
    return summary


def load_stage(work: Path, stage: str, device: str = "cpu") -> Model:
    return load_model(work / stage, device)


def trained_stage(work: Path) -> str:
    """The model that eval and export take: the refined one if refine ran, else the distilled one."""
    return "orthrus" if (work / "orthrus").is_dir() else "diffusion"


def set_threads(threads: int) -> None:
    torch.set_num_threads(threads)
    np.random.seed(0)


def diffusion(work: Path, cfg: DiffusionTrainConfig, device: str = "cpu", log: Log = print) -> dict:
    model = load_stage(work, "base", device)
    summary = train_diffusion(model, load_stream(work / "train.npy"),
                              load_stream(work / "heldout.npy"), cfg, device=device, log=log)
    tok = tokenizer.load_tokenizer(work / "tokenizer")
    save_model(model, work / "diffusion", tok.token_to_id(tokenizer.EOS), work / "tokenizer")
    shutil.rmtree(work / "orthrus", ignore_errors=True)  # a refined model of an earlier drafter
    _write_json(work / "diffusion_summary.json", summary)
    return summary


def refine(work: Path, cfg: DiffusionTrainConfig, rollouts: int, prefix_len: int, gen_len: int,
           device: str = "cpu", log: Log = print) -> dict:
    """Distil again on the base's own greedy continuations (see rollouts.py)."""
    model = load_stage(work, "diffusion", device)
    t0 = time.time()
    rows = greedy_rollouts(model, load_stream(work / "train.npy"), rollouts, prefix_len, gen_len,
                           seed=cfg.seed + 1, device=device)
    log(f"refine: {len(rows)} greedy rollouts of {gen_len} tokens in {time.time() - t0:.0f}s")
    summary = train_diffusion(model, load_stream(work / "train.npy"),
                              load_stream(work / "heldout.npy"), cfg, device=device, log=log,
                              rollouts=rows, rollout_prefix=prefix_len)
    summary.update(rollouts=len(rows), rollout_prefix=prefix_len, rollout_tokens=gen_len,
                   rollout_seconds=time.time() - t0 - summary["seconds"])
    tok = tokenizer.load_tokenizer(work / "tokenizer")
    save_model(model, work / "orthrus", tok.token_to_id(tokenizer.EOS), work / "tokenizer")
    _write_json(work / "refine_summary.json", summary)
    return summary


def evaluate(work: Path, block_sizes: Sequence[int] = (8, 16, 32), max_tokens: int = 64,
             device: str = "cpu", log: Log = print) -> dict:
    """Greedy tokens per step on the held-out prompts, per K (torch decode loop)."""
    model = load_stage(work, trained_stage(work), device)
    tok = tokenizer.load_tokenizer(work / "tokenizer")
    prompts = json.loads((work / "heldout_prompts.json").read_text())
    ids = [tok.encode(p["text"]).ids for p in prompts]
    eos = [tok.token_to_id(tokenizer.EOS)]
    results = {}
    for K in block_sizes:
        t0 = time.time()
        results[K] = evaluate_prompts(model, ids, K, max_tokens, eos, check_ar=(K == model.args.block_size),
                                      device=device)
        results[K]["seconds"] = time.time() - t0
        log(f"eval K={K}: {results[K]['mean_tokens_per_step']:.2f} tokens/step "
            f"histogram {results[K]['histogram']} ar_identical {results[K].get('ar_identical', '-')}")
    _write_json(work / "eval.json", results)
    return results


def export(work: Path, out: Path, log: Log = print) -> None:
    """The shipped folder: the trained checkpoint, tokenizer, held-out prompts and model card."""
    out.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                 "tokenizer_config.json"):
        shutil.copy(work / trained_stage(work) / name, out / name)
    shutil.copy(work / "heldout_prompts.json", out / "heldout_prompts.json")
    summaries = {name: json.loads((work / f"{name}.json").read_text())
                 for name in ("corpus_info", "base_summary", "diffusion_summary", "refine_summary", "eval")}
    (out / "README.md").write_text(model_card(summaries))
    total = sum(f.stat().st_size for f in out.iterdir())
    log(f"export: {out} ({total / 1e6:.2f} MB)")
