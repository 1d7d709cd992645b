"""`orthrus-mlx server` as a real process on a free loopback port, driven over real sockets."""

import argparse
import json
import re
import socket
import struct
import subprocess
import sys
import threading
import time

import pytest

from cli_helpers import cli_env, common_prefix
from http_helpers import raw_http, request
from orthrus_mlx import generate, mlx_generate
from orthrus_mlx.cli.flags import chat_prompt
from orthrus_mlx.cli.server import App, FifoLock, StopStrings

MAX_TOKENS = 12
MESSAGES = [{"role": "user", "content": "Name three colours."}]
PROMPT = "Once upon a time"


@pytest.fixture(scope="module")
def server(model_path, tmp_path_factory):
    """(host, port, log file) of one server for the whole module."""
    log = tmp_path_factory.mktemp("server") / "server.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "orthrus_mlx", "server", "--model", str(model_path),
             "--port", "0", "--max-tokens", "32"],
            stdout=f, stderr=subprocess.STDOUT, env=cli_env(),
        )
    try:
        deadline = time.time() + 90
        while True:
            m = re.search(r"on http://([\d.]+):(\d+)", log.read_text())
            if m:
                break
            assert proc.poll() is None, log.read_text()
            assert time.time() < deadline, "the server did not start"
            time.sleep(0.2)
        yield m.group(1), int(m.group(2)), log
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def stream(server, path, body):
    """The JSON events of an SSE answer, and whether it ended with [DONE]."""
    status, data = request(server, "POST", path, dict(body, stream=True))
    assert status == 200, data
    events = [line[len("data: "):] for line in data.split("\n\n") if line.startswith("data: ")]
    done = events[-1] == "[DONE]"
    return [json.loads(e) for e in events if e != "[DONE]"], done


def expected(loaded, prompt, **kwargs):
    model, tokenizer = loaded
    if isinstance(prompt, list):
        prompt = chat_prompt(tokenizer, prompt, {})
    kwargs.setdefault("max_tokens", MAX_TOKENS)
    return generate(model, tokenizer, prompt, **kwargs)


def chat(server, messages=MESSAGES, **body):
    body.setdefault("max_tokens", MAX_TOKENS)
    return request(server, "POST", "/v1/chat/completions", dict(body, messages=messages))


def good_request_works(server, loaded):
    status, data = chat(server, max_tokens=3)
    assert status == 200, data
    assert data["choices"][0]["message"]["content"] == expected(loaded, MESSAGES, max_tokens=3)


def test_health_and_models(server, model_path):
    assert request(server, "GET", "/health")[0] == 200
    status, data = request(server, "GET", "/v1/models")
    assert status == 200 and data["data"][0]["id"] == str(model_path)


def test_chat_completion_equals_generate(server, loaded):
    status, data = chat(server)
    assert status == 200, data
    choice = data["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": expected(loaded, MESSAGES)}
    assert choice["finish_reason"] in ("stop", "length")
    prompt_len = len(chat_prompt(loaded[1], MESSAGES, {}))
    assert data["usage"]["prompt_tokens"] == prompt_len
    assert 1 <= data["usage"]["completion_tokens"] <= MAX_TOKENS


def test_streamed_chat_equals_generate(server, loaded):
    events, done = stream(server, "/v1/chat/completions",
                          {"messages": MESSAGES, "max_tokens": MAX_TOKENS, "stream_options": {"include_usage": True}})
    assert done
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"])
    assert text == expected(loaded, MESSAGES)
    assert events[-2]["choices"][0]["finish_reason"] in ("stop", "length")
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] >= 1


def test_text_completions_equal_generate(server, loaded):
    body = {"prompt": PROMPT, "max_tokens": MAX_TOKENS}
    status, data = request(server, "POST", "/v1/completions", body)
    assert status == 200, data
    assert data["object"] == "text_completion"
    assert data["choices"][0]["text"] == expected(loaded, PROMPT)
    events, done = stream(server, "/v1/completions", body)
    assert done and "".join(e["choices"][0]["text"] for e in events) == expected(loaded, PROMPT)


def test_seeded_sampling_equals_generate(server, loaded):
    settings = {"temperature": 0.8, "top_p": 0.9, "seed": 5}
    status, data = chat(server, **settings)
    assert status == 200, data
    want = expected(loaded, MESSAGES, temperature=0.8, top_p=0.9, seed=5)
    assert data["choices"][0]["message"]["content"] == want
    events, _ = stream(server, "/v1/chat/completions", dict(settings, messages=MESSAGES, max_tokens=MAX_TOKENS))
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events) == want


def test_openai_client(server, loaded):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"http://{server[0]}:{server[1]}/v1", api_key="unused", max_retries=0)
    answer = client.chat.completions.create(model="orthrus", messages=MESSAGES, max_tokens=MAX_TOKENS)
    assert answer.choices[0].message.content == expected(loaded, MESSAGES)
    chunks = client.chat.completions.create(model="orthrus", messages=MESSAGES, max_tokens=MAX_TOKENS, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected(loaded, MESSAGES)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="orthrus", messages=MESSAGES, max_tokens=10**6)


def test_stop_strings_cut_the_text_and_stop(server, loaded):
    full = expected(loaded, PROMPT, max_tokens=24)
    stop = full[5:7]
    assert len(stop) == 2
    want = full[: full.find(stop)]
    for streamed in (False, True):
        body = {"prompt": PROMPT, "max_tokens": 24, "stop": [stop, "never-there"]}
        if streamed:
            events, done = stream(server, "/v1/completions", body)
            text = "".join(e["choices"][0]["text"] for e in events)
            finish = events[-1]["choices"][0]["finish_reason"]
        else:
            status, data = request(server, "POST", "/v1/completions", body)
            assert status == 200, data
            text, finish = data["choices"][0]["text"], data["choices"][0]["finish_reason"]
        assert (text, finish) == (want, "stop")


def test_fifty_requests_with_a_shared_prefix_reuse_the_cache(server, loaded):
    system = {"role": "system", "content": "You answer questions about numbers, briefly and politely. " * 3}
    tokenizer = loaded[1]
    shared = common_prefix(
        chat_prompt(tokenizer, [system, {"role": "user", "content": "Question 0"}], {}),
        chat_prompt(tokenizer, [system, {"role": "user", "content": "Question 1"}], {}),
    )
    assert shared > 40
    for i in range(50):
        messages = [system, {"role": "user", "content": f"Question {i}"}]
        status, data = chat(server, messages, max_tokens=2)
        assert status == 200, data
        cached = data["usage"]["prompt_tokens_details"]["cached_tokens"]
        if i > 0:
            assert cached >= shared, f"request {i}"
    assert data["choices"][0]["message"]["content"] == expected(loaded, messages, max_tokens=2)


def test_interleaved_conversations_each_keep_their_cache(server, loaded):
    """Two chats taking turns: each turn reuses its own conversation's prompt and answer."""
    tokenizer = loaded[1]
    chats = {
        "a": [{"role": "system", "content": "You talk about rivers."}],
        "b": [{"role": "system", "content": "You talk about mountains."}],
    }
    previous = {}
    for turn in range(3):
        for name, messages in chats.items():
            messages.append({"role": "user", "content": f"Tell me more, part {turn}."})
            status, data = chat(server, messages, max_tokens=6)
            assert status == 200, data
            answer = data["choices"][0]["message"]["content"]
            assert answer == expected(loaded, messages, max_tokens=6)
            prompt = chat_prompt(tokenizer, messages, {})
            cached = data["usage"]["prompt_tokens_details"]["cached_tokens"]
            if name in previous:
                # At least the whole previous prompt of this conversation came from the cache.
                assert cached >= previous[name], (name, turn)
            previous[name] = len(prompt)
            messages.append({"role": "assistant", "content": answer})
    assert request(server, "GET", "/health")[1]["prompt_caches"]


BAD_REQUESTS = [
    ("bad json", b'{"messages": [', 400, "not valid JSON"),
    ("not an object", b"[1, 2]", 400, "JSON object"),
    ("max_tokens type", {"messages": MESSAGES, "max_tokens": "5"}, 400, "max_tokens"),
    ("max_tokens bool", {"messages": MESSAGES, "max_tokens": True}, 400, "max_tokens"),
    ("temperature type", {"messages": MESSAGES, "temperature": "hot"}, 400, "temperature"),
    ("negative temperature", {"messages": MESSAGES, "temperature": -1}, 400, "temperature"),
    ("top_p range", {"messages": MESSAGES, "top_p": 0}, 400, "top_p"),
    ("seed type", {"messages": MESSAGES, "seed": "x"}, 400, "seed"),
    ("seed range", {"messages": MESSAGES, "seed": -1}, 400, "seed"),
    ("stop type", {"messages": MESSAGES, "stop": 5}, 400, "stop"),
    ("stream type", {"messages": MESSAGES, "stream": "yes"}, 400, "stream"),
    ("messages type", {"messages": "hello"}, 400, "messages"),
    ("message content", {"messages": [{"role": "user", "content": 3}]}, 400, "content"),
    ("no messages", {"max_tokens": 3}, 400, "messages"),
    ("max_tokens over context", {"messages": MESSAGES, "max_tokens": 10**6}, 400, "context"),
]


@pytest.mark.parametrize("name, body, status, message", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_request_gets_4xx_and_the_server_keeps_serving(server, loaded, name, body, status, message):
    got, data = request(server, "POST", "/v1/chat/completions", body)
    assert got == status
    assert message in data["error"]["message"]
    good_request_works(server, loaded)


def test_bad_text_prompt_and_unknown_route(server, loaded):
    status, data = request(server, "POST", "/v1/completions", {"prompt": {"text": "hi"}})
    assert status == 400 and data["error"]["param"] == "prompt"
    assert request(server, "POST", "/v1/nothing", {})[0] == 404
    assert request(server, "GET", "/v2/models")[0] == 404
    good_request_works(server, loaded)


def test_oversized_body_gets_413(server, loaded):
    big = json.dumps({"messages": MESSAGES, "padding": "x" * (2 << 20)})
    status, data = request(server, "POST", "/v1/chat/completions", big)
    assert status == 413 and "over the limit" in data["error"]["message"]
    good_request_works(server, loaded)


def test_missing_content_length_gets_411(server, loaded):
    status, body = raw_http(server, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert status == 411 and "Content-Length" in body
    good_request_works(server, loaded)


def test_body_shorter_than_its_content_length_gets_400(server, loaded):
    status, body = raw_http(server, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{}")
    assert status == 400 and "shorter" in body
    good_request_works(server, loaded)


def long_answer_prompt(loaded) -> str:
    """A prompt the model answers at length, so that a disconnect lands mid-answer."""
    model, tokenizer = loaded
    for prompt in (PROMPT, "Tell me a long story about a dragon.", "1, 2, 3, 4,", "The"):
        if len(list(mlx_generate(model, tokenizer.encode(prompt), tokenizer.eos_token_ids, 64))) == 64:
            return prompt
    pytest.skip("the model ends every candidate answer early")


def test_client_that_disconnects_mid_stream(server, loaded):
    prompt = long_answer_prompt(loaded)
    body = json.dumps({"prompt": prompt, "max_tokens": 200, "stream": True}).encode()
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    with socket.create_connection(server[:2], timeout=30) as s:
        s.sendall(head + body)
        received = b""
        while b"data: " not in received:
            received += s.recv(4096)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # reset, not FIN
    # The server notices at its next write, stops generating, and serves the next request.
    good_request_works(server, loaded)
    log = server[2].read_text()
    m = re.search(r"client disconnected mid-stream after (\d+) tokens", log)
    assert m and int(m.group(1)) < 200, log[-2000:]
    status, data = request(server, "POST", "/v1/completions", {"prompt": PROMPT, "max_tokens": MAX_TOKENS})
    assert status == 200 and data["choices"][0]["text"] == expected(loaded, PROMPT)


def test_fifo_lock_serves_in_arrival_order():
    lock, order, inside = FifoLock(), [], []

    def worker(i):
        with lock:
            inside.append(i)
            assert len(inside) == 1  # one at a time
            time.sleep(0.01)
            order.append(i)
            inside.pop()

    with lock:  # hold it while the others queue up, in a known order
        threads = []
        for i in range(8):
            threads.append(threading.Thread(target=worker, args=(i,)))
            threads[-1].start()
            time.sleep(0.02)
    for t in threads:
        t.join(timeout=10)
    assert order == list(range(8))


def test_concurrent_requests_are_served_one_at_a_time_correctly(server, loaded):
    questions = [[{"role": "user", "content": f"Tell me about {w}."}] for w in ("cats", "dogs", "owls", "bees")]
    answers = {}

    def ask(i):
        answers[i] = chat(server, questions[i], max_tokens=8)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(questions))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    for i, q in enumerate(questions):
        status, data = answers[i]
        assert status == 200, data
        assert data["choices"][0]["message"]["content"] == expected(loaded, q, max_tokens=8)


def test_stop_strings_hold_back_a_possible_start_across_pieces():
    stops = StopStrings(["END", "xy"])
    assert stops.feed("abcE") == ("abc", False)  # "E" may start "END"
    assert stops.feed("N") == ("", False)
    assert stops.feed("Dzzz") == ("", True)
    stops = StopStrings(["END"])
    assert stops.feed("hE") == ("h", False)
    assert stops.feed("x") == ("Ex", False)  # not "END" after all: released
    assert stops.feed("E") == ("", False) and stops.flush() == "E"


def test_server_system_prompt_applies_when_the_request_has_none(loaded):
    model, tokenizer = loaded
    defaults = argparse.Namespace(temp=0.0, top_p=1.0, top_k=0, seed=None, max_tokens=8,
                                  system_prompt="Be brief.", no_diffusion=False, block_size=None)
    app = App(model, tokenizer, "m", defaults)
    system = {"role": "system", "content": "Be brief."}
    req = app.request("/v1/chat/completions", {"messages": MESSAGES})
    assert req.prompt == chat_prompt(tokenizer, [system] + MESSAGES, {})
    own = [{"role": "system", "content": "Be long."}] + MESSAGES
    assert app.request("/v1/chat/completions", {"messages": own}).prompt == chat_prompt(tokenizer, own, {})
    assert req.max_tokens == 8 and req.sampling.greedy
