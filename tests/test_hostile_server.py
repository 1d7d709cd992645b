"""A hostile client against a real server on 127.0.0.1, over real sockets.

Every refusal is one JSON error with its status and message, no failure reaches a later
request, and after each hostile case the server answers a normal greedy request with
exactly the text of a fresh `generate`. The server runs in this process (its handler
threads are the real ones) so that a failure can be injected in the middle of a generation.
"""

import argparse
import json
import logging
import shutil
import socket
import threading
import time
from types import SimpleNamespace

import mlx.core as mx
import pytest
from mlx_lm.models.cache import KVCache
from mlx_lm.tokenizer_utils import BPEStreamingDetokenizer
from mlx_lm.utils import load_tokenizer

from http_helpers import raw_http, request
from orthrus_mlx import generate, mlx_generate
from orthrus_mlx.backend import MLXBackend
from orthrus_mlx.cli import main
from orthrus_mlx.cli import server as server_module
from orthrus_mlx.cli.flags import chat_prompt
from orthrus_mlx.cli.server import App, make_server
from orthrus_mlx.core.sampling import GREEDY_TEMPERATURE, MAX_TEMPERATURE, SamplingParams
from orthrus_mlx.prompt_cache import PromptCache
from orthrus_mlx.testing import random_checkpoint, tiny_config

CHAT, TEXT = "/v1/chat/completions", "/v1/completions"
MESSAGES = [{"role": "user", "content": "Name three colours."}]
NORMAL = {"messages": MESSAGES, "max_tokens": 6}


class LogLines(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    """A random checkpoint: unlike the shipped one, its greedy text changes with any wrong key."""
    return random_checkpoint(tmp_path_factory.mktemp("hostile-model"), seed=11)


@pytest.fixture(scope="module")
def served(loaded, tmp_path_factory):
    """The server's App on a free loopback port, serving from a thread, with its log lines.

    It drafts 4 tokens a step; the reference `generate` drafts the checkpoint's 16: greedy
    text must not depend on it."""
    model, tokenizer = loaded
    defaults = argparse.Namespace(
        temp=0.0, top_p=1.0, top_k=0, seed=None, max_tokens=32, system_prompt=None,
        no_diffusion=False, block_size=4, prompt_cache_size=4,
    )
    expected = generate(model, tokenizer, chat_prompt(tokenizer, MESSAGES, {}), max_tokens=6)
    app = App(model, tokenizer, "m", defaults)
    httpd = make_server(app, "127.0.0.1", 0)
    logger, lines = logging.getLogger("orthrus_mlx.server"), LogLines()
    logger.addHandler(lines)
    level = logger.level
    logger.setLevel(logging.INFO)
    with pytest.MonkeyPatch.context() as env:
        env.setenv("ORTHRUS_MLX_CACHE", str(tmp_path_factory.mktemp("cache")))
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        try:
            yield SimpleNamespace(address=httpd.server_address[:2], app=app, log=lines.lines, expected=expected)
        finally:
            stopped = httpd.stop(timeout=120)
            logger.removeHandler(lines)
            logger.setLevel(level)
        assert stopped, "a request handler was still running"


def answers_normally(served):
    status, data = request(served.address, "POST", CHAT, NORMAL)
    assert status == 200, data
    assert data["choices"][0]["message"]["content"] == served.expected


def with_literal(body: dict, field: str, literal: str) -> bytes:
    """`body` plus `"field": literal`, a literal json.dumps would not write (NaN, 1e999, ...)."""
    return (json.dumps(body)[:-1] + f', "{field}": {literal}}}').encode()


def nested(depth: int) -> bytes:
    content = '{"a": ' * depth + "1" + "}" * depth
    return ('{"messages": [{"role": "user", "content": ' + content + "}]}").encode()


# ---- bodies: numbers, nesting, encodings ------------------------------------------------

BODIES = [
    ("int beyond 2**64", CHAT, with_literal(NORMAL, "temperature", "9" * 29), 400, "out of range"),
    ("int of 5000 digits", CHAT, with_literal(NORMAL, "top_k", "9" * 5000), 400, "out of range"),
    ("float overflow", CHAT, with_literal(NORMAL, "temperature", "1e999"), 400, "out of range"),
    ("negative float overflow", CHAT, with_literal(NORMAL, "top_p", "-1e999"), 400, "out of range"),
    ("NaN", CHAT, with_literal(NORMAL, "temperature", "NaN"), 400, "NaN is not a JSON number"),
    ("Infinity", CHAT, with_literal(NORMAL, "temperature", "Infinity"), 400, "Infinity is not"),
    ("-Infinity", CHAT, with_literal(NORMAL, "seed", "-Infinity"), 400, "-Infinity is not"),
    ("seed 2**64", CHAT, dict(NORMAL, seed=2**64), 400, "'seed' must be in [0, 2**64)"),
    ("top_p underflows to 0", CHAT, with_literal(NORMAL, "top_p", "1e-400"), 400, "'top_p' must be in (0, 1]"),
    ("arrays nested 100000 deep", CHAT, b"[" * 100_000, 400, "nested too deeply"),
    ("objects nested 20000 deep", CHAT, nested(20_000), 400, "nested too deeply"),
    ("lone surrogate in prompt", TEXT, b'{"prompt": "a\\ud800b"}', 400, "lone surrogate"),
    ("lone surrogate in content", CHAT, b'{"messages": [{"role": "user", "content": "\\udfff"}]}', 400,
     "lone surrogate"),
    ("lone surrogate in role", CHAT, b'{"messages": [{"role": "\\ud83d", "content": "hi"}]}', 400,
     "lone surrogate"),
    ("lone surrogate in stop", CHAT, with_literal(NORMAL, "stop", '"\\ud800"'), 400, "lone surrogate"),
    ("invalid UTF-8", TEXT, b'{"prompt": "\xff\xfe"}', 400, "not valid JSON"),
    ("prompt over the context", TEXT, {"prompt": "hello world " * 400, "max_tokens": 1}, 400, "context of"),
    ("token ids out of the vocabulary", TEXT, {"prompt": [1, 2**40]}, 400, "token ids must be in"),
]


@pytest.mark.parametrize("name, path, body, status, message", BODIES, ids=[b[0] for b in BODIES])
def test_hostile_body_gets_one_json_error(served, name, path, body, status, message):
    got, data = request(served.address, "POST", path, body)
    assert got == status, data
    assert message in data["error"]["message"]
    answers_normally(served)


def test_a_body_at_the_size_limit_is_refused_quickly(served):
    """A 1 MB message renders and encodes in bounded time, then fails the context check."""
    body = {"messages": [{"role": "user", "content": "x" * (server_module.MAX_BODY_BYTES - 100)}]}
    tic = time.perf_counter()
    status, data = request(served.address, "POST", CHAT, body)
    assert status == 400 and "context of" in data["error"]["message"]
    assert time.perf_counter() - tic < 20
    answers_normally(served)


def test_a_valid_surrogate_pair_is_not_refused(served):
    status, data = request(served.address, "POST", TEXT, b'{"prompt": "\\ud83d\\ude00", "max_tokens": 2}')
    assert status == 200, data
    answers_normally(served)


# ---- numeric extremes: one rule for API, CLI and server ---------------------------------


@pytest.mark.parametrize("temperature", [1e-30, 1e-6, 5e-324])
def test_a_tiny_temperature_decodes_greedily_on_the_server(served, temperature):
    status, data = request(served.address, "POST", CHAT, dict(NORMAL, temperature=temperature, seed=3))
    assert status == 200, data
    assert data["choices"][0]["message"]["content"] == served.expected
    answers_normally(served)


def test_an_integer_temperature_past_int64_is_refused_not_a_crash(served):
    """2**63 is no MLX scalar (it was std::bad_cast); as a temperature it would be uniform noise."""
    for temperature in (2**63, 2**64 + 1, 101):
        status, data = request(served.address, "POST", CHAT, dict(NORMAL, temperature=temperature, seed=1))
        assert status == 400, data
        assert "temperature must be in [0, 100]" in data["error"]["message"]
        answers_normally(served)


def test_sampling_params_refuse_non_finite_numbers_and_floor_to_greedy():
    for bad in (float("inf"), float("nan"), -float("inf"), 10**400):
        with pytest.raises(ValueError, match="temperature must be a finite number"):
            SamplingParams(temperature=bad)
    with pytest.raises(ValueError, match="top_p must be a finite number"):
        SamplingParams(top_p=float("nan"))
    with pytest.raises(ValueError, match="seed must be"):
        SamplingParams(seed=2**64)
    assert SamplingParams(temperature=GREEDY_TEMPERATURE / 2).greedy
    assert not SamplingParams(temperature=GREEDY_TEMPERATURE).greedy
    assert SamplingParams(temperature=MAX_TEMPERATURE).temperature == MAX_TEMPERATURE
    with pytest.raises(ValueError, match="temperature must be in"):
        SamplingParams(temperature=2**63)


def test_api_tiny_temperature_is_greedy_and_infinite_is_refused(loaded):
    model, tokenizer = loaded
    prompt = tokenizer.encode("Once upon a time")
    greedy = list(mlx_generate(model, prompt, max_tokens=8))
    assert list(mlx_generate(model, prompt, max_tokens=8, temperature=1e-30, seed=0)) == greedy
    with pytest.raises(ValueError, match="finite"):
        list(mlx_generate(model, prompt, max_tokens=8, temperature=float("inf")))
    with pytest.raises(ValueError, match="temperature must be in"):
        list(mlx_generate(model, prompt, max_tokens=8, temperature=2**63, seed=0))  # was std::bad_cast


def test_cli_refuses_infinite_temperature_and_template_keywords(model_path, loaded, tmp_path, monkeypatch, capsys):
    """The `orthrus-mlx generate` entry point, in this process: one line on stderr."""
    monkeypatch.setenv("ORTHRUS_MLX_CACHE", str(tmp_path))
    base = ["generate", "--model", str(model_path), "--prompt", "Name three colours.", "--max-tokens", "6"]
    for value in ("inf", "nan", "-inf"):
        assert main(base + [f"--temp={value}"]) == 1
        out, err = capsys.readouterr()
        assert out == "" and err.count("\n") == 1 and "temperature must be a finite number" in err
    for variables, key in (('{"tokenize": true}', "tokenize"), ('{"chat_template": "{{ 1 }}"}', "chat_template")):
        with pytest.raises(SystemExit) as exit:
            main(base + ["--chat-template-args", variables])
        out, err = capsys.readouterr()
        assert exit.value.code == 2 and err.count("\n") == 1, err
        assert f"chat template argument '{key}' is not allowed" in err
    assert main(base + ["--temp", "1e-30", "--seed", "1", "--block-size", "4"]) == 0
    model, tokenizer = loaded
    want = generate(model, tokenizer, chat_prompt(tokenizer, MESSAGES, {}), max_tokens=6)
    assert capsys.readouterr().out == want + "\n"


# ---- the chat template: variables only, bounded output ----------------------------------

TEMPLATE_KEYWORDS = ["chat_template", "tokenize", "add_generation_prompt", "continue_final_message",
                     "return_dict", "tools", "documents", "padding", "max_length"]


@pytest.mark.parametrize("keyword", TEMPLATE_KEYWORDS)
def test_template_keywords_other_than_variables_are_refused(served, keyword):
    value = "{{ 'x' * 3000000 }}" if keyword == "chat_template" else True
    tic = time.perf_counter()
    status, data = request(served.address, "POST", CHAT, dict(NORMAL, chat_template_kwargs={keyword: value}))
    assert status == 400, data
    assert data["error"]["message"].startswith(f"chat template argument '{keyword}' is not allowed")
    assert data["error"]["param"] == "chat_template_kwargs"
    assert time.perf_counter() - tic < 5
    answers_normally(served)


@pytest.mark.parametrize("kwargs, message", [
    ({"enable_thinking": {"nested": True}}, "must be a string, number, boolean or null"),
    ({"enable_thinking": [1]}, "must be a string, number, boolean or null"),
    ([{"enable_thinking": False}], "'chat_template_kwargs' must be of type dict"),
])
def test_template_variables_must_be_json_scalars(served, kwargs, message):
    status, data = request(served.address, "POST", CHAT, dict(NORMAL, chat_template_kwargs=kwargs))
    assert status == 400 and message in data["error"]["message"], data
    answers_normally(served)


def test_a_known_template_variable_is_passed(served):
    status, data = request(served.address, "POST", CHAT, dict(NORMAL, chat_template_kwargs={"enable_thinking": False}))
    assert status == 200 and data["choices"][0]["message"]["content"] == served.expected
    answers_normally(served)


@pytest.mark.parametrize("path, body", [
    (CHAT, {"messages": [{"role": "user", "content": "y" * 3000}]}),
    (TEXT, {"prompt": "y" * 3000}),
])
def test_the_rendered_prompt_is_bounded_in_characters(served, monkeypatch, path, body):
    monkeypatch.setattr(server_module, "MAX_PROMPT_CHARS", 2000)
    status, data = request(served.address, "POST", path, body)
    assert status == 400, data
    assert "over the limit of 2000 characters" in data["error"]["message"]
    monkeypatch.undo()
    answers_normally(served)


RAISING_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('Unknown role: ' + m['role']) }}{% endif %}"
    "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_a_template_that_raises_gets_400(served, model_path, tmp_path, monkeypatch):
    folder = shutil.copytree(model_path, tmp_path / "tok", ignore=shutil.ignore_patterns("*.safetensors"))
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps(dict(config, chat_template=RAISING_TEMPLATE)))
    monkeypatch.setattr(served.app, "tokenizer", load_tokenizer(folder))
    status, data = request(served.address, "POST", CHAT, {"messages": [{"role": "tool", "content": "x"}]})
    assert status == 400 and data["error"]["param"] == "messages", data
    assert data["error"]["message"] == "The chat template failed: Unknown role: tool"
    monkeypatch.undo()
    answers_normally(served)


# ---- a failure in the middle of a generation reaches no later request -------------------


def lazy_prefill(self, tokens, params):
    self.model(mx.array(tokens)[None], cache=self.cache)  # the cache now holds an unevaluated graph


def lazy_verify(self, token, drafted, params):
    self.passes(mx.array([[token]]), self.cache, "verify")


def torn_write(self, keys, values, write=KVCache.update_and_fetch):
    # mlx-lm's KVCache moves its offset before it writes: a write that raises leaves the
    # cache claiming slots that hold no keys (zeros, in a fresh buffer).
    write(self, mx.zeros_like(keys), mx.zeros_like(values))


FAILURES = {  # where, on which call, and what runs before the failure
    "prefill": (MLXBackend, "prefill", 1, lazy_prefill),
    "cache write": (KVCache, "update_and_fetch", tiny_config()["num_hidden_layers"], torn_write),  # prefill, last layer
    "draft": (MLXBackend, "draft", 2, MLXBackend.draft),
    "verify": (MLXBackend, "verify", 2, lazy_verify),
    "detokenizer": (BPEStreamingDetokenizer, "add_token", 3, BPEStreamingDetokenizer.add_token),
}


def inject_failure(monkeypatch, where: str) -> None:
    cls, name, on_call, before = FAILURES[where]
    original, calls = getattr(cls, name), []

    def failing(self, *args):
        calls.append(1)
        if len(calls) == on_call:
            before(self, *args)
            raise RuntimeError(f"injected failure in {where}")
        return original(self, *args)

    monkeypatch.setattr(cls, name, failing)


@pytest.mark.parametrize("streamed", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("where", list(FAILURES))
def test_a_failed_generation_drops_its_cache(served, loaded, monkeypatch, where, streamed):
    """The next request sharing the failed one's prefix gets a fresh, correct answer."""
    # Unlike every other prompt from its first word, so that it forks little of a cached one.
    messages = [{"role": "user", "content": f"{'Streamed' if streamed else 'Whole'}: {where} fails, and then?"}]
    body = {"messages": messages, "max_tokens": 12, "stream": streamed}
    inject_failure(monkeypatch, where)
    status, data = request(served.address, "POST", CHAT, body)
    monkeypatch.undo()
    if streamed:  # the answer had begun: the stream stops short of [DONE]
        assert status == 200 and "data: [DONE]" not in data
    else:
        assert status == 500 and data["error"]["message"] == f"Generation failed: injected failure in {where}"
    assert any(f"generation failed: RuntimeError: injected failure in {where}" in line for line in served.log)
    model, tokenizer = loaded
    want = generate(model, tokenizer, chat_prompt(tokenizer, messages, {}), max_tokens=12)
    for stream in (False, True):  # twice: the second one reuses what the first one cached
        status, data = request(served.address, "POST", CHAT, dict(body, stream=stream))
        assert status == 200, data
        if stream:
            events = [json.loads(e[6:]) for e in data.split("\n\n") if e.startswith("data: {")]
            text = "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"])
        else:
            text = data["choices"][0]["message"]["content"]
        assert text == want
    answers_normally(served)


# ---- the HTTP layer: request lines, headers, logs ---------------------------------------


def raw_request(head: bytes, body: bytes = b"") -> bytes:
    return head + b"\r\nHost: x\r\nConnection: close\r\n\r\n" + body


HTTP_CASES = [
    ("request line over 64 KiB", raw_request(b"GET /" + b"a" * 70_000 + b" HTTP/1.1"), 414, "URI Too Long"),
    ("unsupported method", raw_request(b"PUT /v1/models HTTP/1.1"), 501, "Unsupported method ('PUT')"),
    ("bad version", raw_request(b"GET /health HTTP/9\x1b[2J"), 400, "Bad request version"),
    ("Content-Length with underscore", raw_request(b"POST /v1/completions HTTP/1.1\r\nContent-Length: 1_0"),
     400, "Bad Content-Length header: '1_0'"),
    ("Content-Length with a sign", raw_request(b"POST /v1/completions HTTP/1.1\r\nContent-Length: +2", b"{}"),
     400, "Bad Content-Length header: '+2'"),
    ("Content-Length superscript", raw_request(b"POST /v1/completions HTTP/1.1\r\nContent-Length: \xb2", b"{}"),
     400, "Bad Content-Length header"),
    ("Content-Length of 30 digits", raw_request(b"POST /v1/completions HTTP/1.1\r\nContent-Length: " + b"9" * 30),
     400, "Bad Content-Length header"),
]


@pytest.mark.parametrize("name, data, status, message", HTTP_CASES, ids=[c[0] for c in HTTP_CASES])
def test_http_level_refusals_are_json_too(served, name, data, status, message):
    got, body = raw_http(served.address, data)
    assert got == status
    assert message in json.loads(body)["error"]["message"]
    answers_normally(served)


INJECTIONS = [
    ("escape sequence in the path", b"GET /a\x1b[31mred\x1b[0m HTTP/1.1", 404, "\\x1b[31mred"),
    ("CR in the path", b"GET /a\rINFO forged HTTP/1.1", 400, "/a\\rINFO"),
    ("C1 and U+2028 bytes in the path", b"GET /\xc2\x85\xe2\x80\xa8x HTTP/1.1", 400, "\\x85"),
    ("escape sequence in a bad request line", b"GET /\x1b]0;title\x07 HTTP/1.1 extra", 400, "\\x1b]0;title\\x07"),
    ("backslash escape lookalike", b"GET /a\\x1b HTTP/1.1", 404, "/a\\\\x1b"),
]


@pytest.mark.parametrize("name, line, status, escaped", INJECTIONS, ids=[c[0] for c in INJECTIONS])
def test_control_characters_from_a_request_are_escaped_in_the_log(served, name, line, status, escaped):
    before = len(served.log)
    got, body = raw_http(served.address, raw_request(line))
    assert got == status and json.loads(body)["error"]
    logged = served.log[before:]
    assert any(escaped in entry for entry in logged), logged
    for entry in logged:
        assert not any(ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 or c in "\u2028\u2029" for c in entry), entry
    answers_normally(served)


def test_a_burst_of_fifty_connections_is_queued_not_reset(served):
    """The kernel completes 50 handshakes while the server accepts none; all are then served."""
    httpd = make_server(served.app, "127.0.0.1", 0)
    sockets, serving = [], None
    try:
        for _ in range(50):
            sockets.append(socket.create_connection(httpd.server_address[:2], timeout=2))
        serving = threading.Thread(target=httpd.serve_forever, daemon=True)
        serving.start()
        for s in sockets:
            s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        for s in sockets:
            s.settimeout(30)
            reply = b""
            while chunk := s.recv(65536):
                reply += chunk
            assert reply.split(b"\r\n")[0].endswith(b" 200 OK"), reply[:200]
    finally:
        for s in sockets:
            s.close()
        if serving is not None:
            assert httpd.stop(timeout=120), "a request handler was still running"
        httpd.server_close()
    answers_normally(served)


def test_the_model_runs_on_one_long_lived_thread(served, monkeypatch):
    """MLX keeps every thread's stream: a thread per connection would leak one per request."""
    threads, prefill = [], MLXBackend.prefill

    def recording(self, *args):
        threads.append(threading.get_ident())
        return prefill(self, *args)

    monkeypatch.setattr(MLXBackend, "prefill", recording)
    for i, stream in enumerate((False, True, False)):
        status, _ = request(served.address, "POST", CHAT, dict(NORMAL, stream=stream, messages=[
            {"role": "user", "content": f"Thread question {i}."}]))
        assert status == 200
    assert len(threads) == 3 and len(set(threads)) == 1
    assert threading.get_ident() not in threads
    monkeypatch.undo()
    answers_normally(served)


def test_a_committed_cache_holds_no_graph_of_a_finished_thread(loaded):
    """MLX evaluates a graph only on the stream of the thread that built it."""
    model, _ = loaded
    pc = PromptCache(model)

    def prefill_without_eval():
        model(mx.array([[5, 6, 7]]), cache=pc.cache)
        pc.commit([5, 6, 7], [])

    thread = threading.Thread(target=prefill_without_eval)
    thread.start()
    thread.join()
    mx.eval([(c.keys, c.values) for c in pc.cache])  # "There is no Stream(cpu, N)" if left lazy
    assert len(pc) == 3
