"""The model card (README.md) of the shipped checkpoint, written from the run's summaries."""

from __future__ import annotations

from typing import Dict


def _histogram_rows(hist: Dict[str, int]) -> str:
    total = max(sum(hist.values()), 1)
    rows = []
    for k, count in hist.items():
        if count:
            bar = "#" * max(1, round(40 * count / total))
            rows.append(f"    {int(k):>2} | {count:>4} {bar}")
    return "\n".join(rows)


def model_card(s: Dict[str, dict]) -> str:
    corpus, base, diff, ev = s["corpus_info"], s["base_summary"], s["diffusion_summary"], s["eval"]
    ref = s["refine_summary"]
    base_params = base["base_parameters"]
    diff_params = base["parameters"] - base_params
    per_k = "\n".join(
        f"| {k} | {r['mean_tokens_per_step']:.2f} | {r['steps']} | {r.get('ar_identical', '-')} |"
        for k, r in ev.items()
    )
    hists = "\n\n".join(
        f"K = {k} (tokens per step: count)\n\n```\n{_histogram_rows(r['histogram'])}\n```"
        for k, r in ev.items()
    )
    proxy = "\n".join(
        f"| {k} | {diff['before'][k]['kl']:.3f} -> {diff['after'][k]['kl']:.3f} -> "
        f"{ref['after'][k]['kl']:.3f} | "
        f"{diff['before'][k]['top1']:.3f} -> {diff['after'][k]['top1']:.3f} -> "
        f"{ref['after'][k]['top1']:.3f} |"
        for k in diff["after"]
    )
    minutes = (base["seconds"] + diff["seconds"] + ref["seconds"] + ref["rollout_seconds"]) / 60
    first = next(iter(ev.values()))
    return f"""---
license: psf-2.0
tags: [orthrus, qwen3, diffusion-drafting, tiny, test-fixture]
---
# orthrus-tiny

A tiny Orthrus model (Qwen3 architecture plus the diffusion view's `*_proj_diff` / `*_norm_diff`
tensors) trained from scratch on CPU by `orthrus_mlx/train`. It exists so that tests, benchmarks
and the README can show real drafting: with random weights every draft is rejected. It writes
plausible-looking Python, nothing more.

## Data

The Python {corpus['python_version']} standard library's own `*.py` sources (PSF License 2.0),
without `test/`, `idlelib/`, `lib2to3/`, `encodings/`, `pydoc_data/` and files over 200 kB.
Files are split by a hash of their relative path: {corpus['train_files']} training files
({corpus['train_tokens']:,} tokens), {corpus['heldout_files']} held-out files
({corpus['heldout_tokens']:,} tokens) that neither stage trained on. `heldout_prompts.json` holds
{first['prompts']} prompts cut from the held-out files (as text, so results do not depend on the
local Python).

## Model

Byte-level BPE tokenizer ({corpus['vocab_size']} tokens, trained on the training files) with
`<|endoftext|>` (EOS), `<|im_start|>`, `<|im_end|>` and `<|mask|>` (the `mask_token_id`).
{base_params:,} base parameters plus {diff_params:,} diffusion-view parameters (float32, tied
embeddings); see `config.json` for the shape.

## Training (PyTorch, CPU)

1. Base: next-token cross-entropy, AdamW, cosine schedule, sequences of 256 tokens;
   {base['steps']} steps, {base['tokens_seen']:,} tokens seen, {base['seconds'] / 60:.1f} min;
   held-out loss {base['final_heldout_loss']:.3f} nats/token.
2. Diffusion view on the frozen base: only `*_proj_diff` / `*_norm_diff` train, initialised from
   the AR weights. Blocks `[x_s, MASK, ...]` of K positions (K drawn from 8/16/32 per step) at
   random starts attend to the AR keys/values of positions `< s` and bidirectionally to the
   block; loss KL(base || draft) against the base's next-token distributions;
   {diff['steps']} steps, {diff['sequences_seen']:,} sequences of 256 tokens,
   {diff['seconds'] / 60:.1f} min.
3. Refinement on the base's own greedy text: {ref['rollouts']:,} random training prefixes of
   {ref['rollout_prefix']} tokens continued greedily by the base for {ref['rollout_tokens']} tokens
   ({ref['rollout_seconds'] / 60:.1f} min), then the same distillation with blocks starting inside
   the greedy part; {ref['steps']} steps, {ref['seconds'] / 60:.1f} min. At decoding time the
   prefix is the base's greedy output and a draft counts only if it equals the base's argmax, so
   this is the distribution the drafts are judged against.

Total training time {minutes:.0f} min on a shared 2-core CPU (1 torch thread, other jobs running).
The base stage ran under a wall-clock budget (`--base-minutes 25`), which set its step count.
To recreate the run on any machine with the same steps and seeds (the base's cosine schedule then
follows the steps instead of the clock, so the weights differ slightly):

    python -m orthrus_mlx.train --out orthrus_mlx/assets/orthrus-tiny --threads 1 \\
        --base-steps {base['steps']} --diff-steps {diff['steps']} --refine-steps {ref['steps']} \\
        --rollouts {ref['rollouts']}

## Drafting on held-out text

Greedy, {first['max_tokens']} new tokens per prompt on the {first['prompts']} held-out prompts;
tokens per step = accepted drafts + 1 (torch decode loop of `orthrus_mlx/train/evaluate.py`,
following docs/DESIGN.md section 3; the output equals AR greedy decoding). The MLX engine gives the
same figures on this checkpoint; `tests/test_shipped_model.py` holds it above a floor.

| K | mean tokens / step | steps | identical to AR greedy |
| --- | --- | --- | --- |
{per_k}

{hists}

Held-out teacher-forced block metrics on real text: before -> after stage 2 -> after stage 3
(a proxy only: on real text the base's argmax is conditioned on text the draft cannot see):

| K | KL(base \\|\\| draft) | top-1 agreement |
| --- | --- | --- |
{proxy}

What limits it: a {base_params / 1e6:.1f}M-parameter base trained for minutes (held-out loss
{base['final_heldout_loss']:.2f} nats/token) is unsure of most tokens beyond the next one or two, so
the draft, which must guess several positions ahead from masks alone, mostly agrees with it on
boilerplate (indentation, closing brackets, `self.`, repeated identifiers). The steps that accept a
whole block are the base's greedy output repeating itself (a run of `#` lines,
`self._w, self._w, ...`), which a tiny base does often. Larger K helps only through those
repeats; a stronger base and longer distillation would raise every bar.
"""
