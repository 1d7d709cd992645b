"""The shared decoding step: a scripted backend, then greedy MLX decoding vs mlx-lm's own AR loop."""

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.generate import generate_step
from mlx_lm.models import qwen3

from orthrus_mlx import DecodeStats, load_model, mlx_generate, stream_generate
from orthrus_mlx.backend import adaptive_block, cost_key
from orthrus_mlx.core import costs
from orthrus_mlx.core.costs import CostStore, machine_key, user_store
from orthrus_mlx.core.policy import AR_RECHECK, AdaptiveBlock
from orthrus_mlx.core.sampling import SamplingParams
from orthrus_mlx.core.step import Scores, accept, decode, token_ids
from orthrus_mlx.generate import mlx_generate_steps
from orthrus_mlx.testing import random_weights, save_checkpoint, tiny_config


class ScriptedBackend:
    """The 'model' continues token x with (x + 1) % 50; drafts are right for `good` positions."""

    vocab_size, max_positions = 50, 1000

    def __init__(self, good: int):
        self.good = good
        self.cache = 0
        self.passes = []

    def prefill(self, tokens, params):
        self.cache += len(tokens)
        return (tokens[-1] + 1) % 50

    def draft(self, token, length, params):
        self.passes.append(("draft", self.cache, length))
        truth = [(token + i) % 50 for i in range(1, length)]
        return [t if i < self.good else 49 for i, t in enumerate(truth)]

    def verify(self, token, drafted, params):
        block = [token] + (drafted or [])
        self.passes.append(("verify", self.cache, len(block)))
        self.cache += len(block)
        return Scores(drafted or [], [(t + 1) % 50 for t in block])

    def trim(self, n):
        self.cache -= n

    def cache_length(self):
        return self.cache


def run(backend, prompt, stats=None, **options):
    """decode()'s tokens, one at a time, its steps counted in `stats`."""
    return list(token_ids(decode(backend, prompt, **options), stats))


@pytest.mark.parametrize("good", [0, 2, 7, 100])
def test_step_emits_accepted_drafts_plus_bonus_and_trims_the_cache(good):
    backend, stats = ScriptedBackend(good), DecodeStats()
    out = run(backend, [3, 4], stats, max_tokens=20, eos_token_id=None, block_size=8)
    assert out == [(5 + i) % 50 for i in range(20)]
    per_step = min(good, 7) + 1
    assert stats.tokens_per_step[:-1] == [per_step] * (len(stats.tokens_per_step) - 1)
    # The cache holds the prompt and every emitted token but the last.
    assert backend.cache == 2 + 20 - 1
    # Each step drafts from the committed state, then verifies at the same position.
    for (d, d_at, d_len), (v, v_at, v_len) in zip(backend.passes[::2], backend.passes[1::2]):
        assert (d, v, d_at, d_len) == ("draft", "verify", v_at, v_len)


def test_block_shrinks_to_fit_max_tokens_and_stops_at_eos_inside_a_block():
    backend = ScriptedBackend(good=100)
    out = run(backend, [0], max_tokens=12, eos_token_id=None, block_size=8)
    assert len(out) == 12
    assert [length for kind, _, length in backend.passes if kind == "verify"] == [8, 3]

    backend, stats = ScriptedBackend(good=100), DecodeStats()
    out = run(backend, [0], stats, max_tokens=30, eos_token_id=[6, 40], block_size=8)
    assert out == list(range(1, 7))
    assert stats.tokens_per_step == [5]  # the step drafted 7 and all were right, but EOS came 5th


@pytest.mark.parametrize("good", [0, 3, 100])
def test_steps_count_only_the_tokens_emitted(good):
    """Cut by EOS or by max_tokens, a step counts what it emitted, not what it accepted."""
    for max_tokens, eos in [(30, [6, 17]), (13, None), (1, None)]:
        stats = DecodeStats()
        out = run(ScriptedBackend(good), [0], stats, max_tokens=max_tokens, eos_token_id=eos, block_size=8)
        assert 1 + sum(stats.tokens_per_step) == len(out)
        assert stats.prompt_tokens == 1


@pytest.mark.parametrize("good", [0, 2, 100])
def test_step_records_say_which_tokens_are_accepted_drafts(good):
    steps = list(decode(ScriptedBackend(good), [0], max_tokens=40, eos_token_id=None, block_size=5))
    assert (steps[0].tokens, steps[0].drafted, steps[0].accepted) == ([1], 0, 0)  # the prefill's
    emitted = 1
    for step in steps[1:]:
        # L - 1 drafted, the first `good` right: accepted drafts, then the verify pass's bonus.
        drafted = min(5, 40 - emitted) - 1
        accepted = min(good, drafted)
        assert (step.drafted, step.accepted, len(step.tokens)) == (drafted, accepted, accepted + 1)
        emitted += len(step.tokens)
    assert [t for s in steps for t in s.tokens] == list(range(1, 41))


def test_ar_mode_runs_no_draft_pass():
    backend = ScriptedBackend(good=100)
    assert run(backend, [0], max_tokens=5, eos_token_id=None, block_size=1) == [1, 2, 3, 4, 5]
    assert {kind for kind, _, _ in backend.passes} == {"verify"}


def test_sampling_acceptance_stops_at_first_rejection():
    class Always:
        def random(self):
            return 0.5

    scores = Scores(draft=[1, 2, 3], target=[7, 8, 9, 10], ratio=[1.0, 0.9, 0.2])
    assert accept(scores, SamplingParams(temperature=1.0), Always()) == 2
    scores = Scores(draft=[1, 2], target=[7, 8, 9], ratio=[2.0, 1.0])
    assert accept(scores, SamplingParams(temperature=1.0), Always()) == 2


def self_drafting(weights):
    """Diffusion weights copied from the AR view: random, yet drafts that often agree."""
    return {**weights, **{k: weights[k.replace("_diff", "")] for k in weights if "_diff" in k}}


@pytest.fixture(scope="module")
def small_vocab_checkpoint(tmp_path_factory):
    config = tiny_config(vocab_size=24, mask_token_id=23, eos_token_id=None, block_size=8)
    weights = self_drafting(random_weights(config, seed=11))
    path = save_checkpoint(tmp_path_factory.mktemp("ck"), config, weights, tokenizer=False)
    reference = qwen3.Model(qwen3.ModelArgs.from_dict(config))
    reference.load_weights([(k, mx.array(v)) for k, v in weights.items() if "_diff" not in k])
    return path, reference


def mlx_lm_greedy(model, prompt, max_tokens, eos=()):
    out = []
    for token, _ in generate_step(mx.array(prompt), model, max_tokens=max_tokens):
        out.append(int(token))
        if token in eos:
            break
    return out


@pytest.mark.parametrize("block_size", [2, 3, 8, 16])
def test_greedy_equals_mlx_lm_ar_decoding(small_vocab_checkpoint, block_size):
    path, reference = small_vocab_checkpoint
    model, _ = load_model(path)
    rng = np.random.default_rng(block_size)
    accepted_drafts = 0
    for trial in range(6):
        prompt = rng.integers(0, 23, rng.integers(1, 30)).tolist()
        max_tokens = int(rng.integers(1, 45))  # most end mid-block
        stats = DecodeStats()
        got = list(mlx_generate(model, prompt, None, max_tokens, block_size=block_size, stats=stats))
        assert got == mlx_lm_greedy(reference, prompt, max_tokens), f"trial {trial}"
        accepted_drafts += sum(stats.tokens_per_step) - stats.steps
    assert accepted_drafts > 0, "no draft was ever accepted: the acceptance path went untested"


def test_greedy_stops_at_eos_inside_a_block(small_vocab_checkpoint):
    path, reference = small_vocab_checkpoint
    model, _ = load_model(path)
    rng = np.random.default_rng(7)
    cut_short = 0
    for trial in range(8):
        prompt = rng.integers(0, 23, 12).tolist()
        free = mlx_lm_greedy(reference, prompt, 40)
        fresh = [i for i, t in enumerate(free) if t not in free[:i]]
        eos = free[fresh[-1]]  # the last token to first appear, so it ends the text late
        want = free[: free.index(eos) + 1]
        steps = list(mlx_generate_steps(model, prompt, [eos], 40))
        got = [t for step in steps for t in step.tokens]
        assert got == want == mlx_lm_greedy(reference, prompt, 40, eos=[eos])
        cut_short += steps[-1].accepted == len(steps[-1].tokens)  # EOS among the accepted drafts
    assert cut_short > 0, "EOS never landed inside a block"


def test_use_diffusion_false_is_plain_ar(small_vocab_checkpoint):
    path, reference = small_vocab_checkpoint
    model, _ = load_model(path)
    stats = DecodeStats()
    got = list(mlx_generate(model, [1, 2, 3], None, 30, use_diffusion=False, stats=stats))
    assert got == mlx_lm_greedy(reference, [1, 2, 3], 30)
    assert stats.tokens_per_step == [1] * 29


def test_prompt_cache_continues_a_conversation(small_vocab_checkpoint):
    path, reference = small_vocab_checkpoint
    model, _ = load_model(path)
    cache = model.make_cache()
    first = list(mlx_generate(model, [4, 5, 6], None, 10, prompt_cache=cache))
    # The cache now holds the prompt and all but the last emitted token.
    assert cache[0].offset == 3 + 10 - 1
    stats = DecodeStats()
    second = list(mlx_generate(model, [first[-1], 9, 10], None, 10, prompt_cache=cache, stats=stats))
    assert stats.prompt_tokens == 3
    assert second == mlx_lm_greedy(reference, [4, 5, 6] + first + [9, 10], 10)


def test_upstream_call_form_works(small_vocab_checkpoint):
    path, _ = small_vocab_checkpoint
    model, _ = load_model(path)
    tokens = mx.array([[1, 2, 3]])
    assert len(list(mlx_generate(model, tokens, 0, max_tokens=5))) <= 5


def run_policy(policy, acceptance, steps, true_cost=None):
    """Drive a policy with drafts accepted with the given per-index rates; returns chosen lengths.
    `true_cost[L]`, if given, is what a step of length L really takes (the policy is told)."""
    rng = np.random.default_rng(0)
    chosen = []
    for _ in range(steps):
        length = policy.length(1000)
        m = 0
        while m < length - 1 and rng.random() < acceptance:
            m += 1
        seconds = None if true_cost is None else true_cost[length] * rng.uniform(0.9, 1.1)
        policy.update(length, m + 1, seconds)
        chosen.append(length)
    return chosen


def test_adaptive_block_drafts_long_when_drafts_are_good_and_passes_are_flat():
    policy = AdaptiveBlock(16, [0.0] + [1.0 + 0.01 * n for n in range(1, 17)])
    chosen = run_policy(policy, acceptance=0.97, steps=60)
    assert min(chosen[10:]) >= 12


@pytest.mark.parametrize("slope", [0.02, 0.5, 1.5])
def test_adaptive_block_costs_at_most_5_percent_over_ar_when_drafts_are_useless(slope):
    cost = [0.0] + [1.0 + slope * n for n in range(1, 17)]
    policy = AdaptiveBlock(16, cost)
    chosen = run_policy(policy, acceptance=0.0, steps=400)
    assert sum(cost[n] for n in chosen) <= 1.05 * 400 * cost[1]
    # Once learned: AR with rare length-2 probes, at growing intervals.
    probes = [n for n, length in enumerate(chosen) if length > 1 and n >= 50]
    assert len(probes) <= 4 and all(chosen[n] == 2 for n in probes), probes
    assert list(np.diff(probes)) == sorted(np.diff(probes))


def test_adaptive_block_stays_ar_when_every_extra_token_costs_a_full_pass():
    policy = AdaptiveBlock(8, [0.0] + [float(n) for n in range(1, 9)])
    chosen = run_policy(policy, acceptance=0.9, steps=100)
    assert sum(length > 1 for length in chosen[20:]) <= 3


def test_adaptive_block_finds_a_predictable_stretch_within_a_few_steps():
    """After a long run of useless drafts, text the drafter gets right is drafted long at once."""
    cost = [0.0] + [1.0 + 0.1 * n for n in range(1, 17)]
    policy = AdaptiveBlock(16, cost)
    run_policy(policy, acceptance=0.0, steps=300)
    chosen = run_policy(policy, acceptance=1.0, steps=policy.max_probe_interval + 8)
    first_probe = next(n for n, length in enumerate(chosen) if length > 1)
    # Each fully accepted probe at least doubles the next one: 2, 4, then 8 or more.
    assert chosen[first_probe : first_probe + 2] == [2, 4]
    assert min(chosen[first_probe + 2 :]) >= 8


def test_adaptive_block_shortens_blocks_as_attention_over_the_context_grows():
    base = [0.0] + [1.0 + 0.01 * n for n in range(1, 17)]
    per_position = [0.0] + [0.001 * (n - 1) for n in range(1, 17)]  # attention cost ~ L x context
    policy = AdaptiveBlock(16, base, per_position)
    run_policy(policy, acceptance=0.8, steps=300)
    assert policy.length(1000, context=0) >= 5
    assert policy.length(1000, context=500) < policy.length(1000, context=0)
    assert policy.length(1000, context=50000) == 1


@pytest.fixture
def counted_measurements(monkeypatch, tmp_path):
    """How many times step costs get measured; HOME and the cache folder point into tmp."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("ORTHRUS_MLX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(costs, "PROCESS_STORE", CostStore())
    calls = []
    measure = costs.measure_cost_lines
    monkeypatch.setattr(costs, "measure_cost_lines", lambda *a: calls.append(1) or measure(*a))
    return calls


def test_auto_measures_once_per_process_and_writes_nothing(small_vocab_checkpoint, counted_measurements, tmp_path):
    path, reference = small_vocab_checkpoint
    model, _ = load_model(path)
    for prompt in ([3, 1, 4, 1, 5], [9, 2, 6], [7] * 12):
        got = list(mlx_generate(model, prompt, None, 40, block_size="auto"))
        assert got == mlx_lm_greedy(reference, prompt, 40)
    again, _ = load_model(path)  # the same shapes on the same machine: the same step costs
    list(mlx_generate(again, [1, 2], None, 10, block_size="auto"))
    assert len(counted_measurements) == 1
    assert list(tmp_path.rglob("*")) == [], "the library wrote a file"
    with pytest.raises(ValueError, match="block_size must be an int, 'auto' or a block policy"):
        next(mlx_generate(model, [1], None, 4, block_size="fast"))


def test_a_policy_passed_in_carries_what_it_learned(small_vocab_checkpoint, counted_measurements):
    path, reference = small_vocab_checkpoint
    model, _ = load_model(path)
    policy = adaptive_block(model)
    before = list(policy.tried)
    stats = DecodeStats()
    assert list(mlx_generate(model, [7] * 12, None, 30, block_size=policy, stats=stats)) == mlx_lm_greedy(
        reference, [7] * 12, 30
    )
    assert list(policy.tried) != before, "the generation used another policy"
    assert not hasattr(model, "_adaptive_block")
    learned = list(policy.tried)
    list(mlx_generate(model, [7] * 12, None, 30, block_size=policy, use_diffusion=False))
    assert list(policy.tried) == learned, "an AR generation must not touch the policy"


def test_a_cost_store_with_a_path_keeps_costs_for_the_next_process(
    small_vocab_checkpoint, counted_measurements, tmp_path
):
    path, _ = small_vocab_checkpoint
    model, _ = load_model(path)
    store = user_store()  # what the commands use: $ORTHRUS_MLX_CACHE
    assert store.path == tmp_path / "cache" / "step_costs.json"
    policy = adaptive_block(model, store)
    assert store.path.is_file() and len(counted_measurements) == 1
    later = CostStore(store.path)  # what a new process reads
    assert adaptive_block(model, later).base_cost == policy.base_cost
    assert len(counted_measurements) == 1
    # A store holding only shorter lines (a smaller block size) measures again.
    short = CostStore(tmp_path / "short.json")
    short.entries[cost_key(model)] = {"base": [0.0, 1.0], "per_position": [0.0, 0.0]}
    assert len(adaptive_block(model, short).base_cost) == model.block_size + 1
    assert len(counted_measurements) == 2
    store.path.write_text("{not json")  # damaged: measured again and replaced
    assert CostStore(store.path).entries == {}


def test_step_costs_are_kept_apart_per_blas_setting(monkeypatch):
    """A calibration without a preloaded BLAS (~40x slower matrix products) must not serve one with it."""
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    monkeypatch.delenv("OPENBLAS_NUM_THREADS", raising=False)
    plain = machine_key("mlx", "model")
    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/x86_64-linux-gnu/libopenblas.so.0")
    preloaded = machine_key("mlx", "model")
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "1")
    assert len({plain, preloaded, machine_key("mlx", "model")}) == 3
    assert machine_key("mlx", "model") == machine_key("mlx", "model")


def test_adaptive_block_drafts_once_its_steps_turn_out_cheaper_than_calibrated():
    """A calibration taken on a busy machine said drafting never pays; the timed steps say it does."""
    calibrated = [0.0, 1.0] + [4.0 + 0.1 * n for n in range(2, 17)]
    true_cost = [0.0, 1.0] + [1.8 + 0.05 * n for n in range(2, 17)]
    untimed = run_policy(AdaptiveBlock(16, calibrated), acceptance=0.8, steps=400)
    assert sum(n > 1 for n in untimed[-100:]) <= 5  # probes only
    policy = AdaptiveBlock(16, calibrated)
    chosen = run_policy(policy, acceptance=0.8, steps=600, true_cost=true_cost)
    assert sum(n >= 4 for n in chosen[-100:]) >= 80, chosen[-100:]
    used = max(set(chosen[-100:]), key=chosen[-100:].count)
    assert policy.cost(used) == pytest.approx(true_cost[used], rel=0.15)


def test_adaptive_block_returns_to_ar_once_its_steps_turn_out_dearer_than_calibrated():
    calibrated = [0.0] + [1.0 + 0.01 * n for n in range(1, 17)]
    true_cost = [0.0, 1.0] + [3.0 + 0.5 * n for n in range(2, 17)]
    assert min(run_policy(AdaptiveBlock(16, calibrated), acceptance=0.6, steps=300)[-100:]) >= 4
    chosen = run_policy(AdaptiveBlock(16, calibrated), acceptance=0.6, steps=600, true_cost=true_cost)
    assert sum(n > 1 for n in chosen[-300:]) <= 6, chosen[-300:]  # probes only


def test_adaptive_block_clips_a_stalled_step():
    """One step stalled by the rest of the machine (or compiling its length) must not outweigh many."""
    policy = AdaptiveBlock(4, [0.0, 1.0, 2.0, 2.0, 2.0])
    policy.update(4, 4, seconds=500.0)  # stalled
    assert policy.cost(4) < 2.0 * 4.0
    for _ in range(100):
        policy.update(4, 4, seconds=3.0)
    assert policy.cost(4) == pytest.approx(3.0, rel=0.05)


def test_adaptive_block_settled_on_ar_chooses_again_only_every_few_positions():
    """Choosing a length takes ~0.1 ms of Python, a few percent of a small model's AR step:
    once AR is best, the choice is made again only every AR_RECHECK positions (and at probes)."""
    cost = [0.0] + [1.0 + 0.5 * n for n in range(1, 17)]
    policy = AdaptiveBlock(16, cost)
    context, calls = 0, []

    def decode_steps(n):
        nonlocal context
        for _ in range(n):
            length = policy.length(1000, context)
            policy.update(length, 1, cost[length])  # every draft rejected
            context += 1

    decode_steps(300)  # settled on AR
    best = policy.best
    policy.best = lambda limit: calls.append(limit) or best(limit)
    decode_steps(160)
    assert len(calls) <= 160 // AR_RECHECK + 4, len(calls)


def test_the_configs_eos_ids_stop_generation_when_the_caller_gives_none(small_vocab_checkpoint, tmp_path):
    path, reference = small_vocab_checkpoint
    prompt = [5, 6, 7]
    free = mlx_lm_greedy(reference, prompt, 40)
    eos = next(t for i, t in enumerate(free) if i >= 3 and t not in free[:i])  # first seen mid-text
    folder = shutil.copytree(path, tmp_path / "with-eos")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "eos_token_id": eos}))
    model, _ = load_model(folder)
    for block_size in (1, 4, "auto"):
        got = list(mlx_generate(model, prompt, None, 40, block_size=block_size))
        assert got == free[: free.index(eos) + 1], block_size


def test_stream_generate_marks_the_accepted_drafts(loaded):
    """`from_draft` is True exactly for a step's accepted drafts, False for its bonus token."""
    model, tokenizer = loaded
    stats = DecodeStats()
    responses = list(stream_generate(model, tokenizer, "def read_config(path):\n", 60, block_size=4, stats=stats))
    flags = [r.from_draft for r in responses]
    *whole, last = stats.tokens_per_step  # the last step may be cut short, before its bonus
    want = [False] + [i < n - 1 for n in whole for i in range(n)]
    assert flags[: len(want)] == want
    assert flags[len(want) :] in ([True] * (last - 1) + [False], [True] * last)
    assert any(flags) and not all(flags[1:]), "no draft was accepted, or no step was rejected"
