"""Train an Orthrus drafter adapter for a base model the user already has.

    python -m orthrus_mlx.train.drafter --base BASE --run RUN_DIR [--minutes 60]

BASE is a Hugging Face folder or repo id, or a GGUF file. Stages, each resumable from RUN_DIR:
1. rollouts: the base's own greedy answers to chat prompts of many kinds (questions,
   instructions, writing, code, reasoning, chat), under its chat template (mlx-lm's
   `batch_generate`); held-out prompts get answers too, for evaluation only.
2. distill: the diffusion projections start as copies of the AR ones and learn, by KL
   distillation against the frozen base, to predict the base's next-token distribution at every
   index of a block [x_s, MASK, ...] drawn inside an answer. Checkpoints every few minutes; a
   rerun continues where the last one stopped.
3. export: the adapter folder (diffusion tensors + a config naming its base).
eval (on request): greedy tokens per step on the held-out answers at each K, teacher-forced
(`greedy_decode_steps`: minutes, where decoding the prompts takes an hour on a CPU).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from orthrus_mlx.torch_backend.model import Model, ModelArgs

from .chat_prompts import heldout_prompts, training_prompts
from .diffusion import distill_logits, freeze_base, kl_loss
from .schedule import cosine_lr
from .views import ar_hidden, block_inputs, diffusion_pass


@dataclass
class DistillConfig:
    steps: int = 2000
    minutes: Optional[float] = None  # wall-clock budget of this invocation (resume continues)
    batch: int = 4
    block_sizes: Tuple[int, ...] = (4, 8, 16)
    # Blocks per sequence = this // K: many blocks share one AR pass over the sequence.
    block_tokens_per_seq: int = 128
    lr: float = 3e-4
    warmup: int = 20
    seed: int = 0
    eval_every: int = 100
    checkpoint_minutes: float = 5.0
    bf16: bool = False  # autocast the passes to bfloat16 (for GPUs; not faster on the CPUs tried)
    keep_teacher: bool = True  # keep each row's teacher pass in memory (~14 MB per row for SmolLM2)
    index_decay: float = 1.0  # loss weight of block index i is index_decay**i (see kl_loss)


# ---- the base -------------------------------------------------------------------------


def is_gguf(source: str) -> bool:
    return str(source).endswith(".gguf")


def base_weights(source: str) -> Tuple[Dict[str, np.ndarray], dict, object]:
    """(float32 weights under Hugging Face names, config, Hugging Face tokenizer) of any base."""
    if is_gguf(source):
        from orthrus_mlx.gguf import build_tokenizer, dequantized, read_gguf

        config, weights, meta = read_gguf(source)
        return dequantized(weights, config), config, build_tokenizer(meta)
    from safetensors.numpy import load_file
    from transformers import AutoTokenizer

    from orthrus_mlx.core.checkpoint import read_config, resolve_model_path, weight_files

    path = resolve_model_path(source)
    weights = {}
    for f in weight_files(path):
        weights.update({k: v.astype(np.float32) for k, v in load_file(str(f)).items()})
    return weights, read_config(path), AutoTokenizer.from_pretrained(str(path))


def torch_base(weights: Dict[str, np.ndarray], config: dict, block_size: int, mask_token_id: int) -> Model:
    """The frozen base in the PyTorch model, its diffusion view a copy of the AR view."""
    fields = {k: v for k, v in config.items() if k != "quantization"}
    args = ModelArgs.from_dict({**fields, "block_size": block_size, "mask_token_id": mask_token_id})
    model = Model(args)
    state = {k: torch.from_numpy(v) for k, v in weights.items() if k in model.state_dict()}
    if args.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    missing = [k for k in model.state_dict() if k not in state and "_diff" not in k]
    if missing:
        raise ValueError(f"The base lacks tensors: {missing[:5]}")
    model.load_state_dict(state, strict=False)
    model.copy_ar_to_diffusion()
    return model.eval()


# ---- stage 1: rollouts ------------------------------------------------------------------


def chat_ids(tokenizer, prompt: str) -> List[int]:
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )
    return tokenizer.encode(text, add_special_tokens=False)


def make_rollouts(source: str, prompts: Sequence[str], path: Path, max_tokens: int, batch: int = 32) -> None:
    """Append the base's greedy answers to `path` (jsonl), skipping prompts already answered."""
    import mlx.core as mx
    from mlx_lm.generate import batch_generate
    from mlx_lm.models import llama, qwen3
    from mlx_lm.tokenizer_utils import TokenizerWrapper

    done = {r["prompt"] for r in read_rollouts(path)}
    todo = [p for p in prompts if p not in done]
    if not todo:
        return
    weights, config, hf_tokenizer = base_weights(source)
    fields = {k: v for k, v in config.items() if k != "quantization"}
    arch = {"llama": llama, "qwen3": qwen3}[config["model_type"]]
    model = arch.Model(arch.ModelArgs.from_dict(fields))
    weights = {k: v for k, v in weights.items() if not (fields.get("tie_word_embeddings") and k == "lm_head.weight")}
    model.load_weights([(k, mx.array(v)) for k, v in weights.items()], strict=True)
    eos = config.get("eos_token_id")
    tokenizer = TokenizerWrapper(hf_tokenizer, eos_token_ids=eos if isinstance(eos, list) else [eos])
    path.parent.mkdir(parents=True, exist_ok=True)
    tic = time.time()
    for i in range(0, len(todo), batch):
        chunk = todo[i : i + batch]
        ids = [chat_ids(hf_tokenizer, p) for p in chunk]
        out = batch_generate(model, tokenizer, ids, max_tokens=max_tokens, return_token_ids=True)
        with open(path, "a") as f:
            for prompt, prompt_ids, answer in zip(chunk, ids, out.token_ids):
                f.write(json.dumps({"prompt": prompt, "prompt_ids": prompt_ids, "answer_ids": list(answer)}) + "\n")
        n = i + len(chunk)
        rate = n / (time.time() - tic)
        left = (len(todo) - n) / rate / 60
        print(f"rollouts {len(done) + n}/{len(done) + len(todo)}, {left:.1f} min left", flush=True)


def read_rollouts(path: Path) -> List[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ---- stage 2: distillation ----------------------------------------------------------------


class Sequences:
    """Rollouts as (ids, answer start): blocks start inside the answer, where drafting happens."""

    def __init__(self, rollouts: List[dict], pad_id: int):
        self.rows = [(r["prompt_ids"] + r["answer_ids"], len(r["prompt_ids"])) for r in rollouts if r["answer_ids"]]
        self.pad_id = pad_id

    def __len__(self) -> int:
        return len(self.rows)

    def batch(self, index: Sequence[int], block_size: int, blocks: int, gen: torch.Generator):
        """Right-padded ids [B, T] and block starts [B, blocks]: each block's first token and its
        K-1 teacher positions lie inside the row (padding after a row is never attended)."""
        rows = [self.rows[i] for i in index]
        T = max(len(ids) for ids, _ in rows)
        ids = torch.full((len(rows), T), self.pad_id, dtype=torch.long)
        starts = torch.empty((len(rows), blocks), dtype=torch.long)
        for b, (row, answer) in enumerate(rows):
            ids[b, : len(row)] = torch.tensor(row)
            low, high = max(answer - 1, 1), max(len(row) - block_size + 1, answer)
            starts[b] = torch.randint(low, high + 1, (blocks,), generator=gen)
        return ids, starts.clamp(max=T - block_size + 1)


class TeacherPasses:
    """The frozen base's pass (final hidden states and keys/values) over each training row, kept
    after its first use: the base never changes and a run draws every row many times, so later
    draws skip the teacher's forward pass."""

    def __init__(self, model: Model, data: Sequences):
        self.model, self.data, self.rows = model, data, {}

    @torch.no_grad()
    def batch(self, index: Sequence[int], T: int) -> Tuple[torch.Tensor, list]:
        """`ar_hidden` of the right-padded batch `data.batch(index)` (T positions; padding is
        zeros, which no block attends to)."""
        for i in set(index) - set(self.rows):
            ids = torch.tensor(self.data.rows[i][0], device=self.model.model.embed_tokens.weight.device)[None]
            hidden, kvs = ar_hidden(self.model, ids)
            self.rows[i] = (hidden[0], [(k[0], v[0]) for k, v in kvs])
        pad = lambda x, dim: torch.nn.functional.pad(x, [0, 0] * (x.dim() - dim - 1) + [0, T - x.shape[dim]])
        hidden = torch.stack([pad(self.rows[i][0], 0) for i in index])
        layers = len(self.rows[index[0]][1])
        kvs = [tuple(torch.stack([pad(self.rows[i][1][n][j], 1) for i in index]) for j in (0, 1))
               for n in range(layers)]
        return hidden, kvs


@torch.no_grad()
def evaluate(model: Model, data: Sequences, K: int, blocks: int = 4, seed: int = 1234) -> dict:
    """Held-out KL, top-1 agreement per block index and the teacher-forced accepted prefix + 1 at
    random starts, and greedy decoding's tokens per step (`greedy_decode_steps`)."""
    gen = torch.Generator().manual_seed(seed)
    kls, accepted, agree = [], [], []
    for i in range(0, len(data), 8):
        ids, starts = data.batch(range(i, min(i + 8, len(data))), K, blocks, gen)
        student, teacher = distill_logits(model, ids, starts, K)
        match = (student.argmax(-1) == teacher.argmax(-1)).float()
        kls.append(kl_loss(student, teacher).item())
        accepted.append(match.cumprod(-1).sum(-1).flatten() + 1)
        agree.append(match.flatten(0, 1))
    agree = torch.cat(agree)
    steps = greedy_decode_steps(model, data, K)
    return {"kl": float(np.mean(kls)), "tokens_per_block": torch.cat(accepted).mean().item(),
            "tokens_per_step": sum(steps) / max(len(steps), 1),
            "top1_per_index": [round(v, 3) for v in agree.mean(0).tolist()]}


@torch.no_grad()
def greedy_decode_steps(model: Model, data: Sequences, K: int, max_tokens: int = 128, chunk: int = 64) -> List[int]:
    """Tokens per step that greedy decoding with blocks of K would emit on each row, teacher-forced.

    A row's answer is the base's own greedy output, so decoding its prompt retraces it: the first
    token comes from the prefill, then each step drafts the block [x_s, MASK, ...] at the last
    emitted token s, keeps the drafts that equal the answer's next tokens and emits them plus the
    bonus token. Unlike a mean over blocks at random starts (the proxy of `evaluate`), which
    weights every position once, this weights each position by how often decoding lands on it,
    which is what tokens per step measures. Only the drafts are computed (every start of the
    row in one diffusion pass per `chunk` blocks); the walk over starts is then free."""
    steps: List[int] = []
    mask_id = model.args.mask_token_id
    device = model.model.embed_tokens.weight.device
    for row, answer in data.rows:
        row = row[: answer + max_tokens]
        total = len(row) - answer
        ids = torch.tensor(row, device=device)[None]  # blocks past the row's end read only its keys
        _, kvs = ar_hidden(model, ids)
        drafts = {}
        candidates = list(range(answer, len(row) - 1))
        for i in range(0, len(candidates), chunk):
            starts = torch.tensor(candidates[i : i + chunk], device=device)[None]
            tokens, positions, mask = block_inputs(ids, starts, K, mask_id)
            logits = diffusion_pass(model, kvs, tokens, positions, mask).view(starts.shape[1], K, -1)
            for s, d in zip(starts[0].tolist(), logits[:, :-1].argmax(-1).tolist()):
                drafts[s] = d
        s, emitted = answer, 1
        while emitted < total:
            accepted = 0
            while accepted < K - 1 and s + accepted + 1 < len(row) and drafts[s][accepted] == row[s + accepted + 1]:
                accepted += 1
            n = min(accepted + 1, total - emitted)
            steps.append(n)
            emitted += n
            s += n
    return steps


def save_checkpoint(path: Path, model: Model, opt, step: int, gen: torch.Generator, history: list) -> None:
    state = {"diffusion": model.diffusion_parameters(), "optimizer": opt.state_dict(), "step": step,
             "generator": gen.get_state(), "history": history}
    tmp = path.with_suffix(".tmp")
    torch.save({**state, "diffusion": {k: v.detach().clone() for k, v in state["diffusion"].items()}}, tmp)
    os.replace(tmp, path)


def adapter_tensors(folder: Path) -> Dict[str, torch.Tensor]:
    """An exported adapter's diffusion tensors in float32 under the trainer's names (dequantized
    if the adapter is quantized): a later run can continue from a shipped drafter."""
    import mlx.core as mx

    config = json.loads((folder / "config.json").read_text())
    quant = config.get("quantization")
    stored = mx.load(str(folder / "model.safetensors"))
    tensors = {}
    for name, value in stored.items():
        if name.endswith((".scales", ".biases")):
            continue
        module = name[: -len(".weight")]
        if quant and f"{module}.scales" in stored:
            value = mx.dequantize(value, stored[f"{module}.scales"], stored[f"{module}.biases"],
                                  quant["group_size"], quant["bits"])
        tensors[name] = torch.from_numpy(np.array(value.astype(mx.float32)))
    return tensors


def load_diffusion(model: Model, tensors: Dict[str, torch.Tensor]) -> None:
    params = model.diffusion_parameters()
    if set(tensors) != set(params):
        raise ValueError(f"The adapter's tensors do not match the model's diffusion view: "
                         f"{sorted(set(tensors) ^ set(params))[:4]}")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(tensors[name])


def distill(model: Model, train: Sequences, heldout: Sequences, cfg: DistillConfig, run: Path,
            log=print) -> dict:
    """Train the diffusion view in place, resuming from RUN/checkpoint.pt if present."""
    from tqdm import tqdm

    gen = torch.Generator().manual_seed(cfg.seed)
    params = freeze_base(model)
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.0)
    checkpoint = run / "checkpoint.pt"
    step, history = 0, []
    if checkpoint.is_file():
        state = torch.load(checkpoint, weights_only=False)
        load_diffusion(model, state["diffusion"])
        opt.load_state_dict(state["optimizer"])
        gen.set_state(state["generator"])
        step, history = state["step"], state["history"]
        log(f"resumed at step {step}")
    if step == 0:
        history.append({"step": 0, **evaluate(model, heldout, 8)})
        log(f"before training: {history[-1]}")
    deadline = time.time() + cfg.minutes * 60 if cfg.minutes else math.inf
    saved = time.time()
    teachers = TeacherPasses(model, train) if cfg.keep_teacher else None
    bar = tqdm(total=cfg.steps, initial=step, desc="distill", dynamic_ncols=True)
    while step < cfg.steps and time.time() < deadline:
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, step / cfg.steps, cfg.lr, cfg.warmup)
        K = cfg.block_sizes[int(torch.randint(len(cfg.block_sizes), (1,), generator=gen))]
        index = torch.randint(len(train), (cfg.batch,), generator=gen).tolist()
        ids, starts = train.batch(index, K, max(cfg.block_tokens_per_seq // K, 1), gen)
        teacher_pass = teachers.batch(index, ids.shape[1]) if teachers else None
        with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
            student, teacher = distill_logits(model, ids, starts, K, teacher_pass)
        loss = kl_loss(student, teacher, cfg.index_decay)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        bar.update(1)
        bar.set_postfix(kl=f"{loss.item():.3f}", K=K)
        if step % cfg.eval_every == 0 or step == cfg.steps:
            history.append({"step": step, "train_kl": loss.item(), **evaluate(model, heldout, 8)})
            log(f"step {step}: {history[-1]}")
        if time.time() - saved > cfg.checkpoint_minutes * 60 or step == cfg.steps:
            save_checkpoint(checkpoint, model, opt, step, gen, history)
            saved = time.time()
    bar.close()
    save_checkpoint(checkpoint, model, opt, step, gen, history)
    return {"steps": step, "history": history, "config": asdict(cfg)}


# ---- the command ---------------------------------------------------------------------------


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m orthrus_mlx.train.drafter", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, help="Hugging Face folder or repo id, or a .gguf file")
    p.add_argument("--run", type=Path, required=True, help="run folder (rollouts, checkpoints)")
    p.add_argument("--out", type=Path, default=None, help="adapter folder to write (default RUN/adapter)")
    p.add_argument("--stages", default="rollouts,distill,export")
    p.add_argument("--prompts", type=int, default=400, help="training prompts to answer")
    p.add_argument("--answer-tokens", type=int, default=160, help="longest rollout answer")
    p.add_argument("--block-size", type=int, default=16, help="K written to the adapter's config")
    p.add_argument("--mask-token-id", type=int, default=None,
                   help="an id the base never emits (default: the last special token)")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--minutes", type=float, default=None, help="stop this invocation after so long")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--keep-teacher", action=argparse.BooleanOptionalAction, default=True,
                   help="keep each row's base pass in memory after its first use (faster; ~14 MB/row at 135M)")
    p.add_argument("--bf16", action="store_true", help="autocast to bfloat16 (GPUs)")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--index-decay", type=float, default=1.0,
                   help="weight block index i of the loss by this**i (below 1: favour early indices)")
    p.add_argument("--adapter-bits", type=int, choices=[4, 8], default=None, help="quantize the exported adapter")
    p.add_argument("--train-block-sizes", default="4,8,16", help="K drawn per training step")
    p.add_argument("--init-adapter", type=Path, default=None,
                   help="start the diffusion view from this adapter folder instead of the AR view")
    p.add_argument("--eval-block-sizes", default="4,8,16", help="K of the eval stage")
    p.add_argument("--eval-tokens", type=int, default=128, help="answer tokens the eval stage decodes")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    stages = args.stages.split(",")
    run = args.run
    run.mkdir(parents=True, exist_ok=True)
    if "rollouts" in stages:
        make_rollouts(args.base, training_prompts(args.prompts), run / "rollouts.jsonl", args.answer_tokens)
        make_rollouts(args.base, heldout_prompts(), run / "heldout.jsonl", args.answer_tokens)
    weights, config, tokenizer = base_weights(args.base)
    mask = args.mask_token_id if args.mask_token_id is not None else default_mask_token(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    if "distill" in stages:
        model = torch_base(weights, config, args.block_size, mask).to(args.device)
        if args.init_adapter and not (run / "checkpoint.pt").is_file():
            load_diffusion(model, adapter_tensors(args.init_adapter))
        cfg = DistillConfig(steps=args.steps, minutes=args.minutes, batch=args.batch, lr=args.lr,
                            bf16=args.bf16, keep_teacher=args.keep_teacher, index_decay=args.index_decay,
                            block_sizes=tuple(int(k) for k in args.train_block_sizes.split(",")))
        summary = distill(model, Sequences(read_rollouts(run / "rollouts.jsonl"), pad),
                          Sequences(read_rollouts(run / "heldout.jsonl"), pad), cfg, run)
        (run / "summary.json").write_text(json.dumps(summary, indent=1))
    if "eval" in stages:
        model = torch_base(weights, config, args.block_size, mask).to(args.device)
        trained = run / "checkpoint.pt"
        if trained.is_file():
            load_diffusion(model, torch.load(trained, weights_only=False)["diffusion"])
        elif args.init_adapter:
            load_diffusion(model, adapter_tensors(args.init_adapter))
        heldout = Sequences(read_rollouts(run / "heldout.jsonl"), pad)
        for K in (int(k) for k in args.eval_block_sizes.split(",")):
            steps = greedy_decode_steps(model, heldout, K, args.eval_tokens)
            print(f"K={K}: {sum(steps) / len(steps):.3f} tokens per step over {len(heldout)} held-out answers "
                  f"({len(steps)} steps), histogram {dict(sorted(Counter(steps).items()))}", flush=True)
    if "export" in stages:
        state = torch.load(run / "checkpoint.pt", weights_only=False)
        out = args.out or run / "adapter"
        export_adapter(state["diffusion"], weights, config, args.block_size, mask, out, bits=args.adapter_bits)
        (out / "heldout_prompts.json").write_text(json.dumps(heldout_prompts(), indent=1) + "\n")


def export_adapter(diffusion: Dict[str, torch.Tensor], base: Dict[str, np.ndarray], config: dict,
                   block_size: int, mask_token_id: int, out: Path, bits: Optional[int] = None,
                   group_size: int = 64) -> None:
    """Write the adapter folder (docs/BASES.md): the diffusion tensors (affine-quantized to `bits`
    if given) and a config naming the base they were trained against, fingerprinted on the same
    weights the base loads with."""
    import mlx.core as mx

    from orthrus_mlx.drafter import ADAPTER_FORMAT, fingerprint

    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, value in diffusion.items():
        array = mx.array(value.detach().float().cpu().numpy())
        if bits and array.ndim == 2:
            module = name[: -len(".weight")]
            wq, scales, biases = mx.quantize(array, group_size=group_size, bits=bits)
            tensors.update({f"{module}.weight": wq, f"{module}.scales": scales, f"{module}.biases": biases})
        else:
            tensors[name] = array
    mx.save_safetensors(str(out / "model.safetensors"), tensors, metadata={"format": "mlx"})
    description = {k: config[k] for k in ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads",
                                          "num_key_value_heads", "vocab_size")}
    description["head_dim"] = config.get("head_dim", config["hidden_size"] // config["num_attention_heads"])
    description["fingerprint"] = fingerprint(
        base["model.embed_tokens.weight"], base["model.layers.0.self_attn.q_proj.weight"]
    )
    adapter = {"orthrus_drafter": ADAPTER_FORMAT, "base": description, "block_size": block_size,
               "mask_token_id": mask_token_id}
    if bits:
        adapter["quantization"] = {"group_size": group_size, "bits": bits}
    (out / "config.json").write_text(json.dumps(adapter, indent=2) + "\n")


def default_mask_token(tokenizer) -> int:
    """The highest-numbered special token: chat models do not emit it (SmolLM2: <empty_output>)."""
    return max(tokenizer.all_special_ids + [t for t in tokenizer.added_tokens_decoder])


if __name__ == "__main__":
    main()
