"""Tensor parallelism over 2 processes (`mlx.launch --backend ring` on localhost) against the
single-process run of the same code: one launch per module (tests/distributed_run.py)."""

import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten

from distributed_run import MAX_TOKENS, PROMPT, SERVER_FLAGS, ask_server
from orthrus_mlx import cli
from orthrus_mlx.cli import server
from orthrus_mlx.cli.flags import command_policy, template_kwargs
from orthrus_mlx.core.sampling import SamplingParams
from orthrus_mlx.generate import mlx_generate
from orthrus_mlx.loader import DEFAULT_MODEL, load
from orthrus_mlx.models import model_classes
from orthrus_mlx.models.diffusion import check_shardable, heads_divide
from orthrus_mlx.testing import random_checkpoint, tiny_config, tiny_llama_config

LAUNCH = Path(sys.executable).parent / "mlx.launch"
LAUNCH_TIMEOUT = 420  # ~45 s of CPU in all; minutes on a loaded machine
FLAGS = ["--max-tokens", "8", "--temp", "0", "--block-size", "4"]


def decode(model, **kwargs):
    return list(mlx_generate(model, PROMPT, max_tokens=MAX_TOKENS, **kwargs))


def layer_parameters(model) -> int:
    return sum(v.size for _, v in tree_flatten(model.layers[0].parameters()))


def command(argv, stdin: str = "") -> str:
    out, previous = io.StringIO(), sys.stdin
    sys.stdin = io.StringIO(stdin)
    try:
        with contextlib.redirect_stdout(out):
            assert cli.main(argv) == 0
    finally:
        sys.stdin = previous
    return out.getvalue()


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    """The tiny model split into an 8-bit base and an 8-bit drafter adapter (groups of 32, so
    that o_proj's 192 inputs make 6 groups, 3 per rank)."""
    from orthrus_convert.drafter import split_drafter

    root = tmp_path_factory.mktemp("quantized")
    return split_drafter(
        DEFAULT_MODEL, root / "base", root / "drafter", quantize=True, q_bits=8, q_group_size=32, progress=False
    )


ODD_HEADS = dict(num_attention_heads=3, num_key_value_heads=1, hidden_size=48)  # SmolLM2-135M's 9 and 3, small


@pytest.fixture(scope="module")
def odd_heads(tmp_path_factory):
    """A random Llama whose heads do not divide by 2 ranks (its MLP of 128 does)."""
    return random_checkpoint(tmp_path_factory.mktemp("odd-heads"), tiny_llama_config(**ODD_HEADS), seed=3)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory, quantized, odd_heads):
    if not LAUNCH.is_file():
        pytest.skip("mlx.launch is not installed")
    out = tmp_path_factory.mktemp("ranks")
    script = Path(__file__).parent / "distributed_run.py"
    argv = [str(LAUNCH), "-n", "2", "--backend", "ring", "--", sys.executable, str(script), str(out)]
    # The ranks never touch torch: without it transformers imports in half the time.
    root = str(Path(__file__).parents[1])
    env = dict(os.environ, USE_TORCH="0", PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    # Ranks that diverge wait on each other forever: the whole process group goes at the deadline.
    with socket.socket() as s:  # a free port for rank 0's server
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        argv + [str(DEFAULT_MODEL), *map(str, quantized), str(odd_heads), str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True,
    )
    try:
        output, _ = proc.communicate(timeout=LAUNCH_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"the 2 ranks did not finish in {LAUNCH_TIMEOUT} s (diverged?):\n{output[-3000:]}")
    # mlx.launch exits 0 even when a rank failed: its rank file is then missing.
    assert proc.returncode == 0 and all((out / f"rank{r}.json").is_file() for r in range(2)), output[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.fixture(scope="module")
def single():
    model, _ = load(DEFAULT_MODEL)
    return model


def test_each_rank_holds_half_of_the_heads_and_weights(ranks, single):
    norms = sum(v.size for k, v in tree_flatten(single.layers[0].parameters()) if "norm" in k)
    for rank in ranks:
        assert rank["size"] == 2
        assert rank["heads"] == [single.layers[0].self_attn.n_heads // 2, single.layers[0].self_attn.n_kv_heads // 2]
        assert rank["cache_heads"] == single.layers[0].self_attn.n_kv_heads // 2
        # Every matrix halved; only the per-head norms (and layer norms) are whole on each rank.
        assert 2 * rank["layer_parameters"] - layer_parameters(single) == norms


def test_greedy_and_seeded_sampling_equal_the_single_process_run(ranks, single):
    greedy = decode(single, block_size=4)
    sampled = decode(single, block_size=4, temperature=0.8, seed=7)
    assert greedy == decode(single, block_size=1)  # the reference is AR decoding itself
    for rank in ranks:
        assert rank["greedy"] == greedy
        assert rank["sampled"] == sampled
        assert rank["auto"]["tokens"] == greedy
    # Without a seed, rank 0 draws one for all: the ranks never sample apart.
    assert ranks[0]["unseeded"] == ranks[1]["unseeded"]


def test_auto_takes_rank_zeros_costs_and_decisions(ranks):
    zero, one = ranks[0]["auto"], ranks[1]["auto"]
    # Only rank 0's store had the costs: rank 1 received them rather than measuring alone.
    assert one["costs"] == zero["costs"]
    assert zero["costs"][1] == pytest.approx(0.0105)
    assert one["lengths"] == zero["lengths"] and max(zero["lengths"]) > 1


def test_quantized_base_with_drafter_adapter(ranks, quantized):
    model, _ = load(quantized[0], drafter=quantized[1])
    expected = decode(model, block_size=4)
    for rank in ranks:
        assert rank["quantized"] == expected
        assert rank["quantized_layer_parameters"] < 0.55 * layer_parameters(model)


def test_commands_print_on_rank_zero_only(ranks):
    model = ["--model", str(DEFAULT_MODEL)]
    generated = command(["generate", "--prompt", "hello", *model, *FLAGS])
    assert ranks[0]["generate"]["stdout"] == generated and generated.strip()
    chat = command(["chat", *model, *FLAGS], "hello\n/stats\n")
    answer = chat.splitlines()[:-2]  # the footer's speeds differ, the answer must not
    assert ranks[0]["chat"]["stdout"].splitlines()[:-2] == answer
    assert ranks[0]["chat"]["stdout"].splitlines()[-1].startswith("[1 turns")  # rank 1 followed rank 0's input
    for rank in ranks:
        assert rank["generate"]["code"] == rank["chat"]["code"] == 0
    assert ranks[1]["generate"]["stdout"] == ranks[1]["chat"]["stdout"] == ""


def single_process_answers() -> dict:
    """`ask_server` against the same server in this one process."""
    parser = cli.ArgumentParser()
    server.add_arguments(parser)
    args = parser.parse_args(["--model", str(DEFAULT_MODEL), *SERVER_FLAGS])
    model, tokenizer = server.load_for_server(args, None)
    app = server.App(model, tokenizer, args.model, args, template_kwargs(args), command_policy(model, args))
    httpd = server.make_server(app, "127.0.0.1", 0)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        return ask_server(httpd.server_address[:2])
    finally:
        httpd.stop(timeout=120)


def test_server_answers_from_rank_zero_as_one_process_does(ranks):
    answers = ranks[0]["server"]["answers"]
    assert "error" not in answers, answers["error"]
    expected = single_process_answers()
    assert answers == expected
    assert expected["again"]["choices"] == expected["greedy"]["choices"] and expected["stop"]["finish"] == "stop"
    assert expected["sampled"]["status"] == 200 and expected["sampled"]["usage"]["completion_tokens"] > 0
    # Rank 0 stopped on SIGINT and told rank 1, whose loop ended: both returned 0.
    for rank in ranks:
        assert rank["server"]["code"] == 0, rank["server"]["stderr"][-2000:]
    assert "serving" in ranks[0]["server"]["stderr"] and "serving" not in ranks[1]["server"]["stderr"]


def build(config):
    model_class, args_class = model_classes(config)
    return model_class(args_class.from_dict(config))


TINY_SHAPE = dict(num_attention_heads=6, num_key_value_heads=2, hidden_size=192, head_dim=32, intermediate_size=384)


def test_heads_that_do_not_divide_stay_whole_on_every_rank(ranks, odd_heads):
    model, _ = load(odd_heads)
    expected = decode(model, block_size=4)
    assert expected == decode(model, block_size=1)
    matrices = sum(v.size for k, v in tree_flatten(model.layers[0].mlp.parameters()))
    for rank in ranks:
        assert rank["odd"]["greedy"] == expected
        assert rank["odd"]["heads"] == [3, 1]  # every head on every rank
        # Only the MLP is split: each rank holds half of it and all of the rest.
        assert rank["odd"]["layer_parameters"] == layer_parameters(model) - matrices // 2
    assert "3 query and 1 key/value heads do not divide by 2 ranks" in ranks[0]["odd"]["stderr"]
    assert ranks[1]["odd"]["stderr"] == ""


def test_only_the_mlp_must_divide_by_the_ranks():
    tiny = build(tiny_config(**TINY_SHAPE))
    check_shardable(tiny, 3)  # 6 query and 2 key/value heads: attention whole, MLP of 384 split
    assert heads_divide(tiny, 2) and not heads_divide(tiny, 3)
    # SmolLM2-135M's shape: 9 query and 3 key/value heads split over 3 ranks, stay whole over 2.
    smollm2 = build(
        tiny_llama_config(num_attention_heads=9, num_key_value_heads=3, hidden_size=576, intermediate_size=96)
    )
    check_shardable(smollm2, 2)
    assert heads_divide(smollm2, 3) and not heads_divide(smollm2, 2)
    with pytest.raises(ValueError, match="over 5 ranks: an MLP of width 96 do"):
        check_shardable(smollm2, 5)


def test_quantized_groups_must_divide_by_the_ranks():
    model = build(tiny_config(**TINY_SHAPE))
    nn.quantize(model, group_size=64, bits=8)  # o_proj: 192 inputs in 3 groups
    with pytest.raises(ValueError, match="o_proj's 3 quantization groups"):
        check_shardable(model, 2)


def test_a_request_reaches_the_other_ranks_whole():
    sampling = SamplingParams(0.7, 0.9, 5, 2**64 - 1, logit_bias={5: 1.5, 7: -2.0}, repetition_penalty=1.1)
    req = server.Request([1, 2, 3], 9, sampling, stop=["\n\n", "é"], logprobs=True, top_logprobs=3)
    back = server.request_from_bytes(server.request_bytes(req))
    assert (back.prompt, back.max_tokens, back.sampling, back.stop, back.logprobs, back.top_logprobs) == (
        req.prompt, req.max_tokens, req.sampling, req.stop, req.logprobs, req.top_logprobs
    )
    assert server.request_from_bytes(server.request_bytes(None)) is None  # the stop message


def test_server_refuses_flags_it_cannot_follow_over_ranks(tmp_path):
    parser = cli.ArgumentParser()
    server.add_arguments(parser)
    server.check_distributed_flags(parser.parse_args([]))
    with pytest.raises(ValueError, match="--decode-concurrency does not run under mlx.launch"):
        server.check_distributed_flags(parser.parse_args(["--decode-concurrency", "2"]))
    with pytest.raises(ValueError, match="--prompt-cache-dir does not run under mlx.launch"):
        server.check_distributed_flags(parser.parse_args(["--prompt-cache-dir", str(tmp_path)]))
