"""A few seconds of training on a tiny config must still work: the trainer cannot silently rot."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from orthrus_mlx.core.step import DecodeStats  # noqa: E402
from orthrus_mlx.torch_backend.generate import torch_generate  # noqa: E402
from orthrus_mlx.torch_backend.model import Model, ModelArgs  # noqa: E402
from orthrus_mlx.train.base import BaseTrainConfig, train_base  # noqa: E402
from orthrus_mlx.train.diffusion import DiffusionTrainConfig, train_diffusion  # noqa: E402
from orthrus_mlx.train.evaluate import ar_greedy  # noqa: E402

VOCAB, MASK, EOS = 48, 47, 46


def counting_stream(n_tokens: int, seed: int) -> np.ndarray:
    """Runs a, a+1, a+2, ... (mod 40) of random length, separated by EOS: predictable far ahead."""
    rng = np.random.default_rng(seed)
    out = []
    while len(out) < n_tokens:
        a, length = rng.integers(0, 40), rng.integers(12, 40)
        out += [(a + i) % 40 for i in range(length)] + [EOS]
    return np.asarray(out[:n_tokens], dtype=np.uint16)


def tiny_model() -> Model:
    args = ModelArgs(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=16, rope_theta=10000.0,
                     block_size=8, mask_token_id=MASK)
    model = Model(args)
    model.init_weights(seed=0)
    return model


@pytest.fixture(scope="module")
def trained():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: extra threads only add synchronisation
    torch.manual_seed(0)
    train, heldout = counting_stream(40_000, 0), counting_stream(4_000, 1)
    model = tiny_model()
    base = train_base(model, train, heldout, BaseTrainConfig(steps=60, batch=8, seq_len=64,
                      lr=1e-2, warmup=10, eval_every=30), log=lambda s: None)
    model.copy_ar_to_diffusion()
    diff = train_diffusion(model, train, heldout,
                           DiffusionTrainConfig(steps=40, batch=8, seq_len=64, block_sizes=(8,),
                                                block_tokens_per_seq=32, lr=1e-2, warmup=5,
                                                eval_every=40),
                           eval_block_sizes=(8,), log=lambda s: None)
    yield model, base, diff
    torch.set_num_threads(threads)


def test_base_training_lowers_loss(trained):
    _, base, _ = trained
    first, last = base["history"][0]["heldout_loss"], base["history"][-1]["heldout_loss"]
    assert last < first and last < 1.5


def test_distillation_lowers_kl_and_raises_agreement(trained):
    model, _, diff = trained
    before, after = diff["before"][8], diff["after"][8]
    assert after["kl"] < 0.7 * before["kl"]
    assert after["top1"] > before["top1"] + 0.1
    assert after["tokens_per_block"] > before["tokens_per_block"] + 0.2
    # Only the diffusion view trained.
    assert all(p.requires_grad == ("_diff" in n) for n, p in model.named_parameters())


def test_torch_generate_equals_ar_greedy(trained):
    model, _, _ = trained
    prompt = [5, 6, 7, 8, 9, 10]
    stats = DecodeStats()
    tokens = list(torch_generate(model, prompt, [EOS], max_tokens=30, block_size=8, stats=stats))
    assert tokens == ar_greedy(model, prompt, max_tokens=30, eos_ids=[EOS])
    assert sum(stats.tokens_per_step) + 1 == len(tokens)
    assert stats.steps < len(tokens) - 1  # drafting accepted something


def test_one_token_block_with_copied_weights_is_the_ar_view():
    """Block [x_s] reads AR keys < s plus itself: with diff == AR weights that is the AR view."""
    from orthrus_mlx.train.views import ar_pass, block_inputs, diffusion_pass

    model = tiny_model()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(3)) * 0.1)
        model.copy_ar_to_diffusion()
        ids = torch.randint(0, 40, (2, 20), generator=torch.Generator().manual_seed(4))
        starts = torch.tensor([[1, 7, 19], [3, 4, 12]])
        logits, kvs = ar_pass(model, ids)
        tokens, positions, mask = block_inputs(ids, starts, 1, MASK)
        draft = diffusion_pass(model, kvs, tokens, positions, mask)
    expected = torch.gather(logits, 1, starts[:, :, None].expand(-1, -1, VOCAB))
    torch.testing.assert_close(draft, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits, model(ids), atol=1e-5, rtol=1e-5)
