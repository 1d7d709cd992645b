"""The processor flags of `generate` and the server's processor fields reach the decoding: the
text is what mlx-lm's own decoding with the same processors gives."""

import argparse

import mlx.core as mx
import pytest
from mlx_lm.generate import generate_step
from mlx_lm.sample_utils import make_logits_processors

from cli_helpers import run_cli
from http_helpers import request
from orthrus_mlx import load
from orthrus_mlx.batch import detokenize
from orthrus_mlx.cli import generate as generate_command
from orthrus_mlx.cli.flags import sampling_params
from orthrus_mlx.loader import DEFAULT_MODEL
from server_fixtures import Served

PROMPT = "Once upon a time"
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def tiny():
    return load(DEFAULT_MODEL)


def mlx_lm_tokens(model, tokenizer, max_tokens=MAX_TOKENS, **processing):
    """Greedy tokens of mlx-lm's AR loop over the model's AR view, with mlx-lm's processors."""
    prompt = mx.array(tokenizer.encode(PROMPT))
    processors = make_logits_processors(**processing)
    return [int(t) for t, _ in generate_step(prompt, model, max_tokens=max_tokens, logits_processors=processors)]


def generate_args(*flags):
    return ["generate", "--model", str(DEFAULT_MODEL), "--prompt", PROMPT, "--ignore-chat-template",
            "--max-tokens", str(MAX_TOKENS), "--block-size", "4", *flags]


def test_generate_flags_equal_mlx_lm_with_the_same_processors(tiny):
    model, tokenizer = tiny
    processed = mlx_lm_tokens(model, tokenizer, repetition_penalty=1.6, repetition_context_size=8,
                              presence_penalty=0.5, frequency_penalty=0.3, logit_bias={300: 9.0, 17: 4.0})
    assert processed != mlx_lm_tokens(model, tokenizer), "the processors changed nothing: the test could not fail"
    stop = processed[6]  # ends the text as an extra EOS
    result = run_cli(generate_args(
        "--repetition-penalty", "1.6", "--repetition-context-size", "8", "--presence-penalty", "0.5",
        "--frequency-penalty", "0.3", "--logit-bias", '{"300": 9.0, "17": 4.0}',
        "--extra-eos-token", "99999", "--extra-eos-token", str(stop),
    ))
    assert result.stdout == detokenize(tokenizer, processed[: processed.index(stop)]) + "\n", result.stderr


@pytest.mark.parametrize(
    "flags,message",
    [(["--min-p", "2"], "min_p must be in"), (["--logit-bias", '{"a": 1}'], "logit_bias keys"),
     (["--repetition-context-size", "0"], "repetition_context_size")],
)
def test_bad_processor_flags_are_refused_before_loading(flags, message):
    parser = argparse.ArgumentParser()
    generate_command.add_arguments(parser)
    with pytest.raises(ValueError, match=message):
        sampling_params(parser.parse_args(flags))


def test_server_honours_processor_fields(tiny):
    model, tokenizer = tiny
    processing = dict(logit_bias={300: 9.0}, repetition_penalty=1.6, presence_penalty=3.0, frequency_penalty=0.3)
    want = detokenize(tokenizer, mlx_lm_tokens(model, tokenizer, **processing))
    body = {"prompt": PROMPT, "max_tokens": MAX_TOKENS, **processing, "logit_bias": {"300": 9.0}}
    with Served(model, tokenizer) as served:
        status, answer = request(served.address, "POST", "/v1/completions", body)
        assert status == 200, answer
        assert answer["choices"][0]["text"] == want
        status, answer = request(served.address, "POST", "/v1/completions", {"prompt": PROMPT, "max_tokens": 12})
        assert answer["choices"][0]["text"] != want  # the fields made the difference
        status, answer = request(served.address, "POST", "/v1/completions", body)
        assert answer["choices"][0]["text"] == want  # its prompt now cached: the processors still see it all
        for field, value in [("min_p", 1.5), ("repetition_penalty", -1), ("presence_penalty", "x"),
                             ("logit_bias", {"abc": 1}), ("logit_bias", {"5": "x"}), ("logit_bias", [1]),
                             ("logit_bias", {str(model.args.vocab_size): 1.0}), ("repetition_context_size", 0)]:
            status, answer = request(served.address, "POST", "/v1/completions", {"prompt": PROMPT, field: value})
            assert status == 400, (field, value, answer)
            assert answer["error"]["type"] == "invalid_request_error" and answer["error"]["param"] == field
