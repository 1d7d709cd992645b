"""mlx_lm.server's habits the server shares: CORS and OPTIONS (`--allowed-origins`), SSE
keep-alive comments while a prompt prefills, `--chat-template`, `--prompt-cache-bytes`."""

import argparse
import http.client

import pytest

from http_helpers import request
from orthrus_mlx import generate, load
from orthrus_mlx.cli import main
from orthrus_mlx.cli.flags import chat_prompt
from orthrus_mlx.cli.server import byte_size, load_for_server, read_chat_template
from orthrus_mlx.prompt_cache import PromptCachePool
from orthrus_mlx.testing import random_checkpoint
from server_fixtures import TOOLS_TEMPLATE, Served, sse

CHAT = "/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "Name three colours."}]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return random_checkpoint(tmp_path_factory.mktemp("parity-model"), seed=11)


@pytest.fixture(scope="module")
def model_tokenizer(folder):
    return load(folder)


def exchange(address, method, path, body=b"", headers=None):
    """(status, headers, body) of one request."""
    conn = http.client.HTTPConnection(*address, timeout=60)
    conn.request(method, path, body=body, headers=headers or {})
    response = conn.getresponse()
    data = response.read().decode()
    conn.close()
    return response.status, {k.lower(): v for k, v in response.getheaders()}, data


def test_cors_for_any_origin_by_default(model_tokenizer):
    with Served(*model_tokenizer) as served:
        status, headers, body = exchange(served.address, "OPTIONS", CHAT, headers={"Origin": "http://a.example"})
        assert status == 204 and body == ""
        assert headers["access-control-allow-origin"] == "*"
        assert headers["access-control-allow-methods"] == "*" and headers["access-control-allow-headers"] == "*"
        for method, path, body, want in [
            ("POST", CHAT, b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}', 200),
            ("POST", CHAT, b'{"messages": 3}', 400),  # errors too, in OpenAI's shape
            ("GET", "/nowhere", b"", 404),
            ("GET", "/v1/models", b"", 200),
        ]:
            status, headers, data = exchange(served.address, method, path, body, {"Content-Type": "application/json"})
            assert status == want and headers["access-control-allow-origin"] == "*", (path, data)
        status, data = request(served.address, "POST", CHAT, {"messages": 3})
        assert set(data["error"]) == {"message", "type", "param", "code"}


def test_cors_for_listed_origins_only(model_tokenizer):
    with Served(*model_tokenizer, allowed_origins=["http://ok.example", "http://also.example"]) as served:
        status, headers, _ = exchange(served.address, "OPTIONS", CHAT, headers={"Origin": "http://also.example"})
        assert status == 204 and headers["access-control-allow-origin"] == "http://also.example"
        assert headers["vary"] == "Origin"
        for origin in ("http://evil.example", None):
            status, headers, _ = exchange(served.address, "OPTIONS", CHAT, headers={"Origin": origin} if origin else {})
            assert status == 204 and "access-control-allow-origin" not in headers


def test_keepalive_comments_during_a_chunked_prefill(model_tokenizer):
    """As mlx_lm.server: `: keepalive done/total` at the prefill's start, each chunk and end."""
    model, tokenizer = model_tokenizer
    messages = [{"role": "user", "content": "Tell me about the rivers of Europe, briefly."}]
    with Served(model, tokenizer, prefill_step_size=8) as served:
        body = {"messages": messages, "max_tokens": 6, "stream": True, "stream_options": {"include_usage": True}}
        status, data = request(served.address, "POST", CHAT, body)
        assert status == 200
        answer = sse(data)
        usage = answer.events[-1]["usage"]
        total = usage["prompt_tokens"] - usage["prompt_tokens_details"]["cached_tokens"]
        assert total > 24
        done = [0] + list(range(8, total - 1, 8)) + [total - 1, total]  # the last token alone, as mlx-lm
        assert answer.comments == [f": keepalive {n}/{total}" for n in done]
        # After the role event, before any text: the prefill comes first.
        assert answer.blocks[1: 1 + len(done)] == answer.comments
        text = "".join(e["choices"][0]["delta"].get("content", "") for e in answer.events if e["choices"])
        prompt = chat_prompt(tokenizer, messages, {})
        assert text == generate(model, tokenizer, prompt, max_tokens=6)
        # A whole answer gets none: its body is one JSON document.
        status, data = request(served.address, "POST", CHAT, dict(body, stream=False))
        assert status == 200 and data["choices"][0]["message"]["content"] == text


def test_chat_template_flag_takes_a_file_or_a_template(tmp_path):
    file = tmp_path / "template.jinja"
    file.write_text(TOOLS_TEMPLATE)
    assert read_chat_template(str(file)) == TOOLS_TEMPLATE
    assert read_chat_template(TOOLS_TEMPLATE) == TOOLS_TEMPLATE
    assert read_chat_template(None) is None
    with pytest.raises(ValueError, match="neither a file nor a Jinja template"):
        read_chat_template(str(tmp_path / "missing.jinja"))


def test_chat_template_flag_replaces_the_tokenizers_and_picks_the_tool_parser(folder):
    args = argparse.Namespace(model=str(folder), dtype=None, drafter=None)
    _, plain = load_for_server(args, None)
    assert plain.tool_parser is None
    _, tokenizer = load_for_server(args, TOOLS_TEMPLATE)
    text = tokenizer.apply_chat_template(MESSAGES, tools=[{"type": "function", "function": {"name": "f"}}],
                                         tokenize=False, add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\n# Tools\n") and '"name": "f"' in text
    assert tokenizer.tool_call_start == "<tool_call>" and tokenizer.tool_parser is not None


@pytest.mark.parametrize("flags, message", [
    (["--chat-template", "missing.jinja"], "neither a file nor a Jinja template"),
    (["--chat-template", "{% for %}"], "The chat template failed"),
    (["--prompt-cache-bytes", "lots"], "expected a size"),
])
def test_bad_flags_are_one_line(folder, capsys, flags, message):
    try:
        code = main(["server", "--model", str(folder), "--port", "0", *flags])
    except SystemExit as e:  # argparse's own refusal
        code = e.code
    err = capsys.readouterr().err
    assert code in (1, 2) and message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) <= 3  # argparse adds its usage lines


def test_byte_sizes():
    assert byte_size("8GB") == 8 * 10**9 and byte_size("500M") == 5 * 10**8
    assert byte_size("1.5GiB") == 3 * 2**29 and byte_size("123") == 123 and byte_size(" 2 kb ") == 2000
    for bad in ("", "abc", "0", "-1", "1XB", "1e999", "1.2.3"):
        with pytest.raises(argparse.ArgumentTypeError):
            byte_size(bad)


def kv_bytes(pc) -> int:
    """The pool's bytes counted from the arrays themselves."""
    return sum(c.keys.nbytes + c.values.nbytes for c in pc.cache if c.keys is not None)


def test_prompt_cache_pool_stays_within_its_byte_bound(model_tokenizer):
    model, tokenizer = model_tokenizer
    one = PromptCachePool(model, 8)
    prompts = [tokenizer.encode(f"Conversation {i}: " + "talk " * (10 + 5 * i)) for i in range(4)]

    def fill(pool, prompt):
        pc = pool.take(prompt)
        new = pc.prepare(prompt)
        emitted = list(generate_ids(model, new, pc.cache))
        pool.commit(pc, prompt, emitted)
        return pc

    sizes = [kv_bytes(fill(one, p)) for p in prompts]
    assert one.nbytes == sum(sizes) and len(one) == 4
    bound = sizes[2] + sizes[3]
    bounded = PromptCachePool(model, 8, max_bytes=bound)
    kept = [fill(bounded, p) for p in prompts]
    assert bounded.caches == kept[2:]  # the least recently used went first
    assert bounded.nbytes == sum(kv_bytes(pc) for pc in bounded.caches) <= bound
    tiny = PromptCachePool(model, 8, max_bytes=1)
    fill(tiny, prompts[0])
    assert len(tiny) == 0  # a bound is a bound, even for the newest


def generate_ids(model, prompt, cache):
    from orthrus_mlx import mlx_generate

    return mlx_generate(model, prompt, max_tokens=3, prompt_cache=cache)


def test_server_reports_and_keeps_its_byte_bound(model_tokenizer):
    bound = 200_000  # about one conversation's cache (256 positions x 2 layers, float32): never three
    with Served(*model_tokenizer, prompt_cache_bytes=bound) as served:
        for i in range(3):
            body = {"messages": [{"role": "user", "content": f"Question {i}: " + "why " * 30}], "max_tokens": 2}
            assert request(served.address, "POST", CHAT, body)[0] == 200
            status, health = request(served.address, "GET", "/health")
            assert 0 < health["prompt_cache_bytes"] <= bound
            assert health["prompt_cache_bytes"] == sum(kv_bytes(pc) for pc in served.app.caches.caches)
