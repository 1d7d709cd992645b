"""The drafter trainer on a tiny Llama-shaped base: it learns, only the drafter trains, it resumes."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from orthrus_mlx.torch_backend.model import Model, ModelArgs  # noqa: E402
from orthrus_mlx.train.base import BaseTrainConfig, train_base  # noqa: E402
from orthrus_mlx.train.drafter import DistillConfig, Sequences, distill  # noqa: E402

VOCAB, MASK, EOS = 48, 47, 46


def counting_rows(count: int, seed: int):
    """Chat-like rows: a short 'prompt' of random tokens, then an 'answer' counting up (mod 40)."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(count):
        prompt = rng.integers(0, 40, 6).tolist()
        a = int(rng.integers(0, 40))
        rows.append({"prompt_ids": prompt, "answer_ids": [(a + i) % 40 for i in range(int(rng.integers(20, 40)))]})
    return rows


@pytest.fixture(scope="module")
def llama_base():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    args = ModelArgs(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=16, rope_theta=10000.0,
                     block_size=8, mask_token_id=MASK, model_type="llama")
    model = Model(args)
    model.init_weights(seed=0)
    stream = np.concatenate([r["prompt_ids"] + r["answer_ids"] + [EOS] for r in counting_rows(1500, 0)])
    train_base(model, stream.astype(np.uint16), stream[:4000].astype(np.uint16),
               BaseTrainConfig(steps=60, batch=8, seq_len=64, lr=1e-2, warmup=10, eval_every=60),
               log=lambda s: None)
    model.copy_ar_to_diffusion()
    yield model
    torch.set_num_threads(threads)


def test_llama_base_has_no_qk_norm(llama_base):
    names = [n for n, _ in llama_base.named_parameters()]
    assert not any("q_norm" in n or "k_norm" in n for n in names)
    assert any("q_proj_diff" in n for n in names)


def test_distill_lowers_kl_raises_agreement_and_resumes(llama_base, tmp_path):
    train, heldout = Sequences(counting_rows(64, 1), EOS), Sequences(counting_rows(16, 2), EOS)
    ar_before = {n: p.clone() for n, p in llama_base.named_parameters() if "_diff" not in n}
    cfg = DistillConfig(steps=20, batch=8, block_sizes=(8,), block_tokens_per_seq=32, lr=1e-2,
                        warmup=5, eval_every=20, checkpoint_minutes=0)
    first = distill(llama_base, train, heldout, cfg, tmp_path, log=lambda s: None)
    assert first["steps"] == 20 and (tmp_path / "checkpoint.pt").is_file()
    # A second invocation with a larger budget continues from step 20, not from scratch.
    cfg.steps = 40
    logs = []
    second = distill(llama_base, train, heldout, cfg, tmp_path, log=logs.append)
    assert logs[0] == "resumed at step 20" and second["steps"] == 40
    before, after = second["history"][0], second["history"][-1]
    assert before["step"] == 0 and after["step"] == 40
    assert after["kl"] < 0.7 * before["kl"]
    assert after["tokens_per_block"] > before["tokens_per_block"] + 0.5
    assert np.mean(after["top1_per_index"][1:]) > np.mean(before["top1_per_index"][1:]) + 0.2
    for n, p in llama_base.named_parameters():  # the base stayed frozen
        if "_diff" not in n:
            assert torch.equal(p, ar_before[n]), n


def test_blocks_start_inside_the_answer():
    rows = Sequences([{"prompt_ids": [1] * 10, "answer_ids": [2] * 30}], EOS)
    gen = torch.Generator().manual_seed(0)
    ids, starts = rows.batch([0] * 4, 8, 16, gen)
    assert ids.shape == (4, 40)
    assert starts.min() >= 9 and starts.max() <= 40 - 8 + 1


@pytest.mark.parametrize("bits", [None, 8])
def test_a_run_continues_from_an_exported_adapter(llama_base, tmp_path, bits):
    """export -> adapter_tensors -> load_diffusion gives back the trained view (exactly in float32,
    within the 8-bit quantization step otherwise), so a shipped drafter can train further."""
    from orthrus_mlx.train.drafter import adapter_tensors, export_adapter, load_diffusion

    trained = {n: p.detach().clone() + 0.01 * torch.randn_like(p) for n, p in llama_base.diffusion_parameters().items()}
    weights = {n: p.detach().numpy() for n, p in llama_base.state_dict().items() if "_diff" not in n}
    config = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "head_dim": 16, "vocab_size": VOCAB}
    export_adapter(trained, weights, config, 8, MASK, tmp_path, bits=bits)
    model = Model(llama_base.args)
    load_diffusion(model, adapter_tensors(tmp_path))
    for name, p in model.diffusion_parameters().items():
        err = (p - trained[name]).abs().max().item()
        scale = trained[name].abs().max().item()
        assert err == 0 if bits is None else err < scale / 100, (name, err)
    with pytest.raises(ValueError, match="do not match"):
        load_diffusion(model, {})


def test_kept_teacher_passes_equal_fresh_ones(llama_base):
    """A batch of rows of different lengths, some drawn twice: the kept passes, padded, give the
    teacher and student logits a fresh pass over the padded batch gives."""
    from orthrus_mlx.train.diffusion import distill_logits
    from orthrus_mlx.train.drafter import TeacherPasses

    data = Sequences(counting_rows(8, 3), EOS)
    teachers = TeacherPasses(llama_base, data)
    gen = torch.Generator().manual_seed(0)
    for index in ([0, 1, 2, 3], [3, 5, 0, 5]):
        ids, starts = data.batch(index, 4, 3, gen)
        fresh = distill_logits(llama_base, ids, starts, 4)
        kept = distill_logits(llama_base, ids, starts, 4, teachers.batch(index, ids.shape[1]))
        for a, b in zip(fresh, kept):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert sorted(teachers.rows) == [0, 1, 2, 3, 5]


def test_greedy_decode_steps_equal_a_real_decode(llama_base, tmp_path):
    """The teacher-forced walk over a base's own greedy answers gives, step for step, the tokens
    per step that greedy decoding with the drafter emits (the shared step on the torch backend),
    at every block length: the trainer's diffusion pass drafts what the decoder drafts."""
    import copy

    from orthrus_mlx.core.step import DecodeStats
    from orthrus_mlx.torch_backend.generate import torch_generate
    from orthrus_mlx.train.drafter import greedy_decode_steps
    from orthrus_mlx.train.evaluate import ar_greedy

    model = copy.deepcopy(llama_base)
    cfg = DistillConfig(steps=15, batch=8, block_sizes=(4, 8), block_tokens_per_seq=32, lr=1e-2,
                        warmup=3, eval_every=100, checkpoint_minutes=0)
    distill(model, Sequences(counting_rows(64, 1), EOS), Sequences(counting_rows(4, 2), EOS), cfg, tmp_path,
            log=lambda s: None)
    max_tokens = 24
    prompts = [r["prompt_ids"] for r in counting_rows(6, 5)]
    rows = [{"prompt_ids": p, "answer_ids": ar_greedy(model, p, max_tokens, [EOS])} for p in prompts]
    for K in (2, 4, 8):
        decoded = []
        for p, r in zip(prompts, rows):
            stats = DecodeStats()
            out = list(torch_generate(model, p, EOS, max_tokens, block_size=K, stats=stats))
            assert out == r["answer_ids"]
            decoded += stats.tokens_per_step
        walked = greedy_decode_steps(model, Sequences(rows, EOS), K, max_tokens=max_tokens)
        assert walked == decoded, K
        if K > 2:
            assert len(set(decoded)) > 2, decoded  # accepted runs of several lengths: a real check


def test_index_decay_weights_the_block_indices():
    """decay 1: the plain mean KL over positions; decay 0: block index 0 alone; between: a
    weighted mean with index i weighted decay**i (against torch's own kl_div)."""
    import torch.nn.functional as F

    from orthrus_mlx.train.diffusion import kl_loss

    gen = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 3, 4, 11, generator=gen), torch.randn(2, 3, 4, 11, generator=gen)

    def mean_kl(s, t):
        return F.kl_div(F.log_softmax(s.flatten(0, -2), -1), F.log_softmax(t.flatten(0, -2), -1),
                        log_target=True, reduction="batchmean")

    per_index = torch.stack([mean_kl(student[..., i, :], teacher[..., i, :]) for i in range(4)])
    torch.testing.assert_close(kl_loss(student, teacher), mean_kl(student, teacher))
    torch.testing.assert_close(kl_loss(student, teacher, 0.0), per_index[0])
    weights = 0.5 ** torch.arange(4.0)
    torch.testing.assert_close(kl_loss(student, teacher, 0.5), (weights * per_index).sum() / weights.sum())
