"""KV cache options against mlx-lm's own generate_step with the same options (greedy, token for token)."""

import importlib
import json
from contextlib import contextmanager

import mlx.core as mx
import pytest
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import QuantizedKVCache, RotatingKVCache

from orthrus_mlx import load, mlx_generate
from orthrus_mlx.backend import MLXBackend
from orthrus_mlx.cli import main
from orthrus_mlx.core.sampling import SamplingParams
from orthrus_mlx.generate import mlx_generate_steps
from orthrus_mlx.kv_cache import CacheOptions
from orthrus_mlx.loader import DEFAULT_MODEL
from orthrus_mlx.prompt_cache import PromptCache
from orthrus_mlx.prompt_disk import DiskTier

GROUP = 32  # the tiny model's head dimension; mlx-lm's default 64 does not divide it


@pytest.fixture(scope="module")
def tiny():
    model, tokenizer = load(DEFAULT_MODEL)
    prompts = json.loads((DEFAULT_MODEL / "heldout_prompts.json").read_text())
    return model, [tokenizer.encode(p["text"])[:48] for p in prompts[:2]]


def mlx_lm_greedy(model, prompt, max_tokens, **options):
    return [int(t) for t, _ in generate_step(mx.array(prompt), model, max_tokens=max_tokens, **options)]


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_cache_greedy_equals_mlx_lm(tiny, bits):
    model, prompts = tiny
    accepted, wants = 0, []
    # Quantized from the prefill on, then from a position a block would straddle mid-decoding.
    for prompt, start in zip(prompts, (0, len(prompts[1]) + 11)):
        options = dict(kv_bits=bits, kv_group_size=GROUP, quantized_kv_start=start)
        steps = list(mlx_generate_steps(model, prompt, None, 32, block_size=6, logprobs=True, **options))
        got = [t for step in steps for t in step.tokens]
        rows = mx.stack([row for step in steps for row in step.logprobs])
        reference = list(generate_step(mx.array(prompt), model, max_tokens=32, **options))
        want = [int(t) for t, _ in reference]
        assert got == want, (bits, start)
        # Each token's scores are those of AR decoding on the same quantized cache, not just its
        # argmax: a pass that read full-precision keys where AR reads quantized ones is off by ~1e-2.
        assert mx.abs(rows - mx.stack([lp for _, lp in reference])).max().item() < 1e-4
        accepted += sum(step.accepted for step in steps)
        wants.append(want)
    assert accepted > 0, "no draft was accepted: the quantized verify path went untested"
    if bits == 4:  # the quantization changes this text: the test tells the two caches apart
        assert list(mlx_generate(model, prompts[0], None, 32, block_size=6)) != wants[0]


def test_trim_after_partial_acceptance_keeps_exactly_the_committed_tokens(tiny):
    model, prompts = tiny
    options = CacheOptions(kv_bits=4, kv_group_size=GROUP, quantized_kv_start=0)
    cache = model.make_cache()
    backend = MLXBackend(model, cache, options=options)
    greedy = SamplingParams()
    token = backend.prefill(prompts[0], greedy)
    assert isinstance(cache[0], QuantizedKVCache)
    n = len(prompts[0])
    for _ in range(12):  # until a step accepts some drafts but not all
        scores = backend.verify(token, backend.draft(token, 8, greedy), greedy)
        m = next((i for i, (d, a) in enumerate(zip(scores.draft, scores.target)) if d != a), 7)
        backend.trim(8 - 1 - m)
        n += m + 1
        token = scores.target[m]
        assert cache[0].offset == n
        if 0 < m < 7:
            break
    else:
        pytest.fail("no step accepted part of its drafts")
    # What is kept is what AR decoding keeps: decoding on from this cache continues mlx-lm's text.
    options = dict(kv_bits=4, kv_group_size=GROUP, quantized_kv_start=0)
    want = prompts[0] + mlx_lm_greedy(model, prompts[0], n - len(prompts[0]) + 21, **options)
    assert want[n] == token
    assert list(mlx_generate(model, [token], None, 20, block_size=6, prompt_cache=cache, **options)) == want[n + 1:]


def test_bounded_cache_in_ar_mode_equals_mlx_lm_rotating_cache(tiny):
    model, prompts = tiny
    prompt = prompts[0] + prompts[1]  # 96 tokens through a 40-entry cache, prefilled in chunks of 16
    got = list(mlx_generate(model, prompt, None, 24, block_size=1, max_kv_size=40, prefill_step_size=16))
    cache = [RotatingKVCache(max_size=40, keep=4) for _ in model.layers]  # mlx-lm's make_prompt_cache
    want = mlx_lm_greedy(model, prompt, 24, prompt_cache=cache, prefill_step_size=16)
    assert got == want
    assert got != list(mlx_generate(model, prompt, None, 24, block_size=1)), "the bound changed nothing here"


def test_bounded_cache_with_drafting_is_refused(tiny, capsys):
    model, prompts = tiny
    with pytest.raises(ValueError, match="--block-size 1"):
        next(mlx_generate(model, prompts[0], None, 8, block_size=4, max_kv_size=40))
    assert main(["generate", "--prompt", "x", "--max-kv-size", "64", "--max-tokens", "2"]) == 1
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "--block-size 1" in error


def test_chunked_prefill_gives_the_same_tokens_and_mlx_lm_progress_calls(tiny, monkeypatch):
    model, prompts = tiny
    prompt = prompts[0] + prompts[1]
    calls, theirs = [], []
    wired = []

    @contextmanager
    def recording_wired_limit(model, streams=None):
        wired.append("enter")
        yield
        wired.append("exit")

    monkeypatch.setattr(importlib.import_module("orthrus_mlx.generate"), "wired_limit", recording_wired_limit)
    got = list(mlx_generate(model, prompt, None, 12, block_size=4, prefill_step_size=16,
                            prompt_progress_callback=lambda *a: calls.append(a)))
    assert wired == ["enter", "exit"]
    assert got == list(mlx_generate(model, prompt, None, 12, block_size=4))  # one chunk of 95, then 1
    want = mlx_lm_greedy(model, prompt, 12, prefill_step_size=16, prompt_progress_callback=lambda *a: theirs.append(a))
    assert got == want
    assert calls == theirs == [(0, 96), (16, 96), (32, 96), (48, 96), (64, 96), (80, 96), (95, 96), (96, 96)]


def test_a_quantized_conversation_cache_forks_and_goes_to_disk_and_back(tiny, tmp_path):
    model, prompts = tiny
    options = dict(kv_bits=8, kv_group_size=GROUP, quantized_kv_start=0, block_size=4)
    pc = PromptCache(model)
    emitted = list(mlx_generate(model, pc.prepare(prompts[0]), None, 8, prompt_cache=pc.cache, **options))
    pc.commit(prompts[0], emitted)
    assert isinstance(pc.cache[0], QuantizedKVCache)
    disk = DiskTier(tmp_path, model, 10**9)
    disk.save(pc)
    key, shared = disk.find(prompts[0] + emitted)
    assert shared == len(pc.tokens)
    for copy in (pc.fork(30), disk.load(key)):
        follow = prompts[0] + emitted[:3] if len(copy.tokens) == 30 else prompts[0] + emitted
        new = copy.prepare(follow)
        assert isinstance(copy.cache[0], QuantizedKVCache) and len(new) < len(follow) // 2
        got = list(mlx_generate(model, new, None, 6, prompt_cache=copy.cache, **options))
        assert got == mlx_lm_greedy(model, follow, 6, kv_bits=8, kv_group_size=GROUP, quantized_kv_start=0)
