"""The PyTorch backend against the MLX one: same logits, same greedy tokens, same sampling law.

Both backends run the one decoding step of `orthrus_mlx.core.step`; these tests load the same
random HF-layout checkpoint into both.
"""

import subprocess
import sys
from collections import Counter

import mlx.core as mx
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from orthrus_mlx.backend import MLXBackend
from orthrus_mlx.core.sampling import SamplingParams
from orthrus_mlx.core.step import DecodeStats, decode, token_ids  # noqa: E402
from orthrus_mlx.generate import mlx_generate  # noqa: E402
from orthrus_mlx.loader import load_model as mlx_load_model  # noqa: E402
from orthrus_mlx.testing import random_weights, save_checkpoint, tiny_config  # noqa: E402
from orthrus_mlx.torch_backend.backend import TorchBackend, apply_top_p, log_probs  # noqa: E402
from orthrus_mlx.torch_backend.generate import torch_generate  # noqa: E402
from orthrus_mlx.torch_backend.loader import load_model  # noqa: E402
from reference import NaiveOrthrus, chi_square_p, exact_distribution, softmax  # noqa: E402


def self_drafting(weights):
    """Diffusion weights copied from the AR view: random, yet drafts that often agree."""
    return {**weights, **{k: weights[k.replace("_diff", "")] for k in weights if "_diff" in k}}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: one intra-op thread avoids thread hand-offs that cost more than the math."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def checkpoint(tmp_path_factory, config, seed, drafting=False):
    weights = random_weights(config, seed=seed)
    if drafting:
        weights = self_drafting(weights)
    path = save_checkpoint(tmp_path_factory.mktemp("ck"), config, weights, tokenizer=False)
    return path, weights


# 1. Logits of both views equal the MLX backend's (and the naive numpy reference's).


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("block_size", [4, 8, 16])
def test_both_views_match_mlx(tmp_path_factory, tied, block_size):
    config = tiny_config(tie_word_embeddings=tied, block_size=block_size)
    path, weights = checkpoint(tmp_path_factory, config, seed=block_size + tied)
    ours, _ = load_model(path, device="cpu")
    theirs, _ = mlx_load_model(path)
    naive = NaiveOrthrus(config, weights)
    assert ours.model.embed_tokens.weight.dtype == torch.float32

    rng = np.random.default_rng(block_size)
    tokens = rng.integers(0, 256, 29)
    cache, mlx_cache = ours.make_cache(64), theirs.make_cache()
    # A prefix in chunks, then draft -> verify -> trim as one decoding step does it.
    for chunk in (tokens[:11], tokens[11:12], tokens[12:20]):
        got = ours.step(torch.tensor(chunk[None]), cache)
        want = theirs(mx.array(chunk[None]), cache=mlx_cache)
        assert np.abs(got.numpy() - np.array(want)).max() < 1e-4
    committed = tokens[:20].tolist()
    for n_keep in (3, block_size):
        block = [int(rng.integers(0, 256))] + [config["mask_token_id"]] * (block_size - 1)
        got = ours.draft(torch.tensor([block]), cache).numpy()[0]
        want = np.array(theirs.draft(mx.array([block]), mlx_cache))[0]
        assert np.abs(got - want).max() < 1e-4
        assert np.abs(got - naive.draft(committed, block)).max() < 1e-4
        assert cache.offset == mlx_cache[0].offset == len(committed), "draft wrote the cache"

        verify = [block[0]] + rng.integers(0, 256, block_size - 1).tolist()
        got = ours.step(torch.tensor([verify]), cache).numpy()[0]
        want = np.array(theirs(mx.array([verify]), cache=mlx_cache))[0]
        assert np.abs(got - want).max() < 1e-4
        naive_logits, _ = naive.ar(np.array(committed + verify))
        assert np.abs(got - naive_logits[len(committed) :]).max() < 1e-4
        cache.trim(block_size - n_keep)
        for c in mlx_cache:
            c.trim(block_size - n_keep)
        committed += verify[:n_keep]


def test_static_shape_passes_equal_the_exact_length_ones(tmp_path_factory):
    """The fixed-shape (compile / CUDA graph) form attends over the whole cache, masked."""
    path, _ = checkpoint(tmp_path_factory, tiny_config(), seed=5)
    model, _ = load_model(path, device="cpu")
    cache = model.make_cache(128)
    model.step(torch.arange(10)[None], cache)
    block = torch.tensor([[7] + [259] * 7])
    positions = torch.arange(10, 18)
    with torch.inference_mode():
        full = model.forward_cached(block, positions, cache, diffusion=True)
        exact = model.forward_cached(block, positions, cache, diffusion=True, kv_len=18)
        assert torch.allclose(full, exact, atol=1e-5)
        full = model.forward_cached(block, positions, cache)
        exact = model.forward_cached(block, positions, cache, kv_len=18)
        assert torch.allclose(full, exact, atol=1e-5)


def test_plain_qwen3_checkpoint_loads_in_ar_mode(tmp_path_factory):
    config = tiny_config(block_size=None, mask_token_id=None)
    path, _ = checkpoint(tmp_path_factory, config, seed=6)
    with pytest.warns(UserWarning, match="plain Qwen3"):
        model, _ = load_model(path, device="cpu")
    assert not model.has_diffusion
    stats = DecodeStats()
    out = list(torch_generate(model, [1, 2, 3], None, 12, stats=stats))
    assert len(out) == 12 and set(stats.tokens_per_step) == {1}


def test_loader_names_bad_tensors(tmp_path_factory):
    config = tiny_config()
    weights = random_weights(config, seed=7)
    weights["model.layers.0.self_attn.q_proj.weight"] = weights["model.layers.0.self_attn.q_proj.weight"][:8]
    path = save_checkpoint(tmp_path_factory.mktemp("ck"), config, weights, tokenizer=False)
    with pytest.raises(ValueError, match="q_proj.weight has shape"):
        load_model(path, device="cpu")
    del weights["model.layers.0.self_attn.q_proj.weight"]
    path = save_checkpoint(tmp_path_factory.mktemp("ck"), config, weights, tokenizer=False)
    with pytest.raises(ValueError, match="Missing tensors"):
        load_model(path, device="cpu")


def test_sharded_bf16_checkpoint_loads_like_mlx(tmp_path_factory):
    config = tiny_config()
    path = save_checkpoint(tmp_path_factory.mktemp("ck"), config, random_weights(config, seed=4),
                           dtype="bfloat16", shards=3, tokenizer=False)
    ours, _ = load_model(path, device="cpu")
    theirs, _ = mlx_load_model(path, dtype="float32")
    assert ours.model.embed_tokens.weight.dtype == torch.float32  # CPU default, upcast exactly
    tokens = np.arange(40, 57)[None]
    got = ours.step(torch.tensor(tokens), ours.make_cache(64)).numpy()
    assert np.abs(got - np.array(theirs(mx.array(tokens), cache=theirs.make_cache()))).max() < 1e-4
    bf16, _ = load_model(path, device="cpu", dtype="bfloat16")
    assert bf16.model.layers[0].self_attn.q_proj_diff.weight.dtype == torch.bfloat16
    assert len(list(torch_generate(bf16, [1, 2, 3], None, 12, temperature=0.8, seed=0))) == 12


def test_loader_refuses_what_it_cannot_run(tmp_path_factory):
    for extra, message in [
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "yarn"),
        ({"quantization": {"bits": 4, "group_size": 64}}, "MLX-quantized"),
    ]:
        path, _ = checkpoint(tmp_path_factory, tiny_config(**extra), seed=8)
        with pytest.raises((ValueError, NotImplementedError), match=message):
            load_model(path, device="cpu")


def test_text_generation_equals_mlx(tmp_path_factory):
    from orthrus_mlx import generate as mlx_generate_text
    from orthrus_mlx import load as mlx_load
    from orthrus_mlx.testing import random_checkpoint
    from orthrus_mlx.torch_backend.generate import generate
    from orthrus_mlx.torch_backend.loader import load

    path = random_checkpoint(tmp_path_factory.mktemp("ck"), tiny_config(), seed=9)
    model, tokenizer = load(path, device="cpu")
    text = generate(model, tokenizer, "Hello, Orthrus", max_tokens=24)
    assert text == mlx_generate_text(*mlx_load(path), "Hello, Orthrus", max_tokens=24)
    assert len(text) > 0


# 2. Greedy output: torch Orthrus == torch AR == MLX Orthrus, token for token.


@pytest.fixture(scope="module")
def small_vocab(tmp_path_factory):
    config = tiny_config(vocab_size=24, mask_token_id=23, eos_token_id=None, block_size=8)
    path, _ = checkpoint(tmp_path_factory, config, seed=11, drafting=True)
    return load_model(path, device="cpu")[0], mlx_load_model(path)[0]


@pytest.mark.parametrize("block_size", [2, 5, 8, 16])
def test_greedy_equals_ar_and_mlx(small_vocab, block_size):
    model, mlx_model = small_vocab
    rng = np.random.default_rng(block_size)
    accepted_drafts = 0
    for trial in range(4):
        prompt = rng.integers(0, 23, rng.integers(1, 30)).tolist()
        max_tokens = int(rng.integers(1, 40))  # most end mid-block
        eos = int(rng.integers(0, 23)) if trial == 3 else None
        stats = DecodeStats()
        got = list(torch_generate(model, prompt, eos, max_tokens, block_size=block_size, stats=stats))
        ar = list(torch_generate(model, prompt, eos, max_tokens, use_diffusion=False))
        mlx = list(mlx_generate(mlx_model, prompt, eos, max_tokens, block_size=block_size))
        assert got == ar == mlx, f"trial {trial}"
        accepted_drafts += sum(stats.tokens_per_step) - stats.steps
    assert accepted_drafts > 0, "no draft was ever accepted: the acceptance path went untested"


def test_adaptive_block_size_is_exact(small_vocab, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    model, _ = small_vocab
    for prompt in ([3, 1, 4, 1, 5], [9, 2, 6]):
        got = list(torch_generate(model, prompt, None, 40, block_size="auto"))
        assert got == list(torch_generate(model, prompt, None, 40, use_diffusion=False))
    assert list(tmp_path.iterdir()) == [], "the library wrote a file"
    with pytest.raises(ValueError, match="block_size must be an int, 'auto' or a block policy"):
        next(torch_generate(model, [1], None, 4, block_size="fast"))


def test_the_configs_eos_ids_stop_generation_when_the_caller_gives_none(small_vocab, tmp_path_factory):
    _, mlx_model = small_vocab
    prompt = [5, 6, 7]
    free = list(mlx_generate(mlx_model, prompt, None, 40, use_diffusion=False))
    eos = next(t for i, t in enumerate(free) if i >= 3 and t not in free[:i])  # first seen mid-text
    config = tiny_config(vocab_size=24, mask_token_id=23, eos_token_id=eos, block_size=8)
    path, _ = checkpoint(tmp_path_factory, config, seed=11, drafting=True)  # small_vocab's weights
    model = load_model(path, device="cpu")[0]
    for block_size in (1, 4, "auto"):
        got = list(torch_generate(model, prompt, None, 40, block_size=block_size))
        assert got == free[: free.index(eos) + 1], block_size


# 3. The one shared step runs both backends.


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_shared_decode_drives_both_backends(small_vocab, temperature):
    model, mlx_model = small_vocab
    params = SamplingParams(temperature=temperature, top_k=10, top_p=0.9, seed=3)
    runs = {}
    for name, backend in [
        ("torch", TorchBackend(model, model.make_cache(128), seed=3)),
        ("mlx", MLXBackend(mlx_model, mlx_model.make_cache(), seed=3)),
    ]:
        stats = DecodeStats()
        steps = decode(backend, [3, 1, 4, 1, 5], max_tokens=50, eos_token_id=None, params=params, block_size=8)
        out = list(token_ids(steps, stats))
        assert len(out) == 50 and sum(stats.tokens_per_step) == 49
        assert backend.cache_length() == 5 + 49, "trim left the cache at the wrong length"
        runs[name] = out, stats.tokens_per_step
    if temperature == 0:
        assert runs["torch"] == runs["mlx"]
    else:
        assert max(max(s) for _, s in runs.values()) > 1, "sampling never accepted a draft"


def test_same_seed_same_output(small_vocab):
    model, _ = small_vocab
    runs = [list(torch_generate(model, [1, 2], None, 30, temperature=1.0, seed=s)) for s in (5, 5, 6)]
    assert runs[0] == runs[1] != runs[2]


# Sampling: the same processing as MLX, and the base model's distribution through the shared step.


def test_log_probs_equal_mlx_processing():
    from orthrus_mlx.backend import log_probs as mlx_log_probs

    logits = np.random.default_rng(0).standard_normal((5, 40)).astype(np.float32) * 3
    for params in [
        SamplingParams(0.7, 1.0, 0),
        SamplingParams(1.3, 1.0, 7),
        SamplingParams(1.0, 0.8, 0),
        SamplingParams(0.9, 0.6, 12),
    ]:
        got = log_probs(torch.tensor(logits), params).numpy()
        want = np.array(mlx_log_probs(mx.array(logits), params))
        assert np.array_equal(np.isinf(got), np.isinf(want)), params
        finite = np.isfinite(want)
        assert np.abs(got[finite] - want[finite]).max() < 1e-5, params


def test_top_p_keeps_tokens_whose_mass_above_is_below_top_p():
    lp = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    kept = torch.isfinite(apply_top_p(lp, 0.8)).tolist()
    assert kept == [True, True, False, False]  # mass above: 0, .5, .8, .95


PROMPT = [1, 2, 0]
LENGTH = 4  # the prefill's token, then a step drafting up to 3


@pytest.fixture(scope="module")
def tiny_vocab(tmp_path_factory):
    config = tiny_config(
        vocab_size=4, mask_token_id=3, eos_token_id=None, block_size=4, num_hidden_layers=1,
        hidden_size=32, head_dim=8, intermediate_size=64,
    )
    # Small weights: a spread-out distribution (dozens of likely 4-token continuations).
    weights = random_weights(config, seed=22, scale=0.1)
    path = save_checkpoint(tmp_path_factory.mktemp("ck"), config, weights, tokenizer=False)
    return load_model(path, device="cpu")[0], NaiveOrthrus(config, weights)


@pytest.mark.parametrize(
    "processing",
    [dict(temperature=1.0, top_k=0, top_p=1.0), dict(temperature=1.3, top_k=3, top_p=0.8)],
)
def test_orthrus_samples_follow_the_base_distribution(tiny_vocab, processing):
    model, naive = tiny_vocab
    draws = 1000
    expected = exact_distribution(naive, PROMPT, LENGTH, 4, **processing)
    observed, stats = Counter(), DecodeStats()
    for seed in range(draws):
        observed[tuple(torch_generate(model, PROMPT, None, LENGTH, seed=seed, stats=stats, **processing))] += 1
    assert chi_square_p(observed, expected, draws) > 1e-3
    assert sum(stats.tokens_per_step) > stats.steps, "no draft was ever accepted"


def test_chi_square_rejects_unverified_drafts(tiny_vocab):
    """Guards the test above: the diffusion view's own samples must be caught."""
    model, naive = tiny_vocab
    expected = exact_distribution(naive, PROMPT, LENGTH, 4, temperature=1.0, top_k=0, top_p=1.0)
    rng, observed = np.random.default_rng(0), Counter()
    with torch.inference_mode():
        for _ in range(1000):
            cache = model.make_cache(8)
            first_logits = model.step(torch.tensor([PROMPT]), cache)[0, -1].double().numpy()
            first = int(rng.choice(4, p=softmax(first_logits)))
            q = model.draft(torch.tensor([[first, 3, 3, 3]]), cache)[0, :-1].double().numpy()
            observed[(first,) + tuple(int(rng.choice(4, p=softmax(row))) for row in q)] += 1
    assert chi_square_p(observed, expected, 1000) < 1e-3


def test_torch_ref_imports_no_mlx():
    code = (
        "import sys, importlib.abc\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name.split('.')[0] in ('mlx', 'mlx_lm'):\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import orthrus_mlx.torch_backend.generate, orthrus_mlx.torch_backend.loader\n"
        "assert not any(m.split('.')[0] in ('mlx', 'mlx_lm') for m in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
