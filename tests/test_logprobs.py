"""`stream_generate(logprobs=True)`: each token's row is the base model's own log-softmax,
checked against one plain AR pass over the whole sequence, for drafted and verified tokens."""

import mlx.core as mx
import numpy as np
import pytest

from http_helpers import request
from orthrus_mlx import generate, stream_generate
from orthrus_mlx.cli.flags import chat_prompt
from server_fixtures import Served, sse

PROMPT = "Once upon a time"


def reference_rows(model, prompt, tokens):
    """Log-softmax rows of one cacheless AR pass over prompt + tokens, one per generated token."""
    sequence = mx.array(prompt + tokens[:-1])[None]
    logits = model(sequence)[0].astype(mx.float32)
    rows = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    return np.array(rows[len(prompt) - 1:])


@pytest.mark.parametrize("options", [
    dict(block_size=16),
    dict(block_size=4, temperature=0.8, top_p=0.9, seed=3),
    dict(use_diffusion=False),
], ids=["greedy", "sampled", "ar"])
def test_logprobs_equal_a_plain_ar_pass(loaded, options):
    model, tokenizer = loaded
    prompt = tokenizer.encode(PROMPT)
    responses = list(stream_generate(model, tokenizer, prompt, max_tokens=40, logprobs=True, **options))
    tokens = [r.token for r in responses]
    got = np.stack([np.array(r.logprobs) for r in responses])
    assert got.shape == (len(tokens), model.args.vocab_size)
    want = reference_rows(model, prompt, tokens)
    drafted = [r.from_draft for r in responses]
    if options.get("use_diffusion", True):
        assert any(drafted) and not all(drafted), drafted  # both kinds are checked
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    # The sampled token's own log-probability is what the server reports.
    assert all(np.isfinite(got[i, t]) for i, t in enumerate(tokens))


def test_logprobs_stay_off_by_default(loaded):
    model, tokenizer = loaded
    responses = list(stream_generate(model, tokenizer, PROMPT, max_tokens=4))
    assert all(r.logprobs is None for r in responses)


def test_logprobs_with_a_prompt_cache_holding_earlier_tokens(loaded):
    model, tokenizer = loaded
    first, second = tokenizer.encode(PROMPT), tokenizer.encode(" there was")
    cache = model.make_cache()
    for _ in stream_generate(model, tokenizer, first, max_tokens=1, prompt_cache=cache):
        pass
    # The cache now holds `first`; the generation's rows must still match the whole sequence.
    responses = list(stream_generate(model, tokenizer, second, max_tokens=20, prompt_cache=cache,
                                     block_size=8, logprobs=True))
    tokens = [r.token for r in responses]
    got = np.stack([np.array(r.logprobs) for r in responses])
    np.testing.assert_allclose(got, reference_rows(model, first + second, tokens), atol=1e-5, rtol=0)


# ---- over HTTP: mlx_lm.server's shape, whole and streamed, both endpoints ----------------

MESSAGES = [{"role": "user", "content": "Name three colours."}]


@pytest.fixture(scope="module")
def served(loaded):
    with Served(*loaded) as s:  # drafts 4 tokens a step
        yield s


def check_entries(model, prompt, entries, top):
    """Each entry's logprob and top alternatives against the plain AR pass."""
    tokens = [e["id"] for e in entries]
    rows = reference_rows(model, prompt, tokens)
    for entry, row in zip(entries, rows):
        assert abs(entry["logprob"] - row[entry["id"]]) < 1e-5
        assert set(entry) >= {"id", "token", "logprob"}
        if top:
            best = np.argsort(-row)[:top].tolist()
            assert [t["id"] for t in entry["top_logprobs"]] == best
            np.testing.assert_allclose([t["logprob"] for t in entry["top_logprobs"]], row[best], atol=1e-5)


def test_chat_logprobs_whole_and_streamed(served, loaded):
    model, tokenizer = loaded
    prompt = chat_prompt(tokenizer, MESSAGES, {})
    body = {"messages": MESSAGES, "max_tokens": 24, "logprobs": True, "top_logprobs": 3}
    status, data = request(served.address, "POST", "/v1/chat/completions", body)
    assert status == 200, data
    entries = data["choices"][0]["logprobs"]["content"]
    assert len(entries) == data["usage"]["completion_tokens"]
    check_entries(model, prompt, entries, 3)
    assert data["choices"][0]["message"]["content"] == generate(model, tokenizer, prompt, max_tokens=24)

    status, text = request(served.address, "POST", "/v1/chat/completions", dict(body, stream=True))
    events = sse(text).events
    streamed = [e for ev in events for e in (ev["choices"][0]["logprobs"] or {}).get("content", [])]
    assert streamed == entries

    status, data = request(served.address, "POST", "/v1/chat/completions", dict(body, logprobs=False, top_logprobs=0))
    assert data["choices"][0]["logprobs"] is None


def test_completion_logprobs_take_openai_integer_form(served, loaded):
    model, tokenizer = loaded
    body = {"prompt": PROMPT, "max_tokens": 12, "logprobs": 2}
    status, data = request(served.address, "POST", "/v1/completions", body)
    assert status == 200, data
    entries = data["choices"][0]["logprobs"]["content"]
    check_entries(model, tokenizer.encode(PROMPT), entries, 2)
    status, text = request(served.address, "POST", "/v1/completions", dict(body, stream=True))
    events = sse(text).events
    assert [e for ev in events for e in ev["choices"][0]["logprobs"]["content"]] == entries


BAD = [
    ("chat", {"logprobs": "yes"}, "'logprobs' must be of type bool"),
    ("chat", {"logprobs": 3}, "'logprobs' must be of type bool"),
    ("chat", {"top_logprobs": 21}, "'top_logprobs' must be in [0, 20]"),
    ("chat", {"top_logprobs": True}, "'top_logprobs' must be of type int"),
    ("chat", {"top_logprobs": 2.5}, "'top_logprobs' must be of type int"),
    ("text", {"logprobs": 21}, "'logprobs' must be true, false or in [0, 20]"),
    ("text", {"logprobs": -1}, "'logprobs' must be true, false or in [0, 20]"),
]


@pytest.mark.parametrize("kind, fields, message", BAD)
def test_bad_logprobs_fields_get_400(served, kind, fields, message):
    path, body = ("/v1/chat/completions", {"messages": MESSAGES}) if kind == "chat" else ("/v1/completions",
                                                                                          {"prompt": PROMPT})
    status, data = request(served.address, "POST", path, dict(body, max_tokens=2, **fields))
    assert status == 400 and message in data["error"]["message"], data
    status, data = request(served.address, "POST", path, dict(body, max_tokens=2))
    assert status == 200, data


def test_openai_client_reads_logprobs(served, loaded):
    openai = pytest.importorskip("openai")
    model, tokenizer = loaded
    client = openai.OpenAI(base_url=f"http://{served.address[0]}:{served.address[1]}/v1", api_key="x", max_retries=0)
    answer = client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=8, logprobs=True, top_logprobs=2)
    content = answer.choices[0].logprobs.content
    assert len(content) == answer.usage.completion_tokens
    assert all(len(c.top_logprobs) == 2 and c.top_logprobs[0].logprob >= c.logprob - 1e-6 for c in content)
