"""Anthropic's Messages API at /v1/messages: the same answers as the chat path, in Anthropic's
message and event shapes; tool use and thinking from scripted answers; errors in its shape."""

import json

import pytest

from http_helpers import raw_http, request
from orthrus_mlx import generate, load
from orthrus_mlx.cli.anthropic import chat_body
from orthrus_mlx.cli.flags import chat_prompt
from server_fixtures import Served, tools_checkpoint, use_script

MESSAGES = "/v1/messages"
USER = [{"role": "user", "content": "Name three colours."}]
WEATHER = {"name": "get_weather", "description": "The weather in a city",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


def named_events(data: str):
    """(event name, payload) pairs of an SSE body with named events; comments skipped."""
    out = []
    for block in data.split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.split("\n") if line and not line.startswith(":"))
        if lines:
            out.append((lines["event"], json.loads(lines["data"])))
    return out


@pytest.fixture(scope="module")
def served(loaded):
    with Served(*loaded) as s:
        yield s


@pytest.fixture(scope="module")
def tools_served(tmp_path_factory):
    folder = tools_checkpoint(tmp_path_factory.mktemp("anthropic-tools"))
    with Served(*load(folder)) as s:
        yield s


def test_a_message_equals_the_chat_answer(served, loaded):
    model, tokenizer = loaded
    system = "Answer briefly."
    body = {"model": "m", "max_tokens": 12, "system": system, "messages": USER}
    status, data = request(served.address, "POST", MESSAGES, body)
    assert status == 200, data
    prompt = chat_prompt(tokenizer, [{"role": "system", "content": system}] + USER, {})
    want = generate(model, tokenizer, prompt, max_tokens=12)
    assert data["type"] == "message" and data["role"] == "assistant" and data["id"].startswith("msg_")
    assert data["content"] == [{"type": "text", "text": want}]
    usage = data["usage"]
    assert usage["input_tokens"] + usage["cache_read_input_tokens"] == len(prompt)
    assert data["stop_reason"] == ("max_tokens" if usage["output_tokens"] == 12 else "end_turn")
    assert data["stop_sequence"] is None

    status, text = request(served.address, "POST", MESSAGES, dict(body, stream=True))
    assert status == 200
    events = named_events(text)
    names = [name for name, _ in events]
    assert names[0] == "message_start" and names[-2:] == ["message_delta", "message_stop"]
    assert names[1] == "content_block_start" and names[-3] == "content_block_stop"
    assert set(names[2:-3]) == {"content_block_delta"}
    assert all(payload["type"] == name for name, payload in events)
    streamed = "".join(p["delta"]["text"] for n, p in events if n == "content_block_delta")
    assert streamed == want
    assert events[-2][1]["delta"]["stop_reason"] == data["stop_reason"]
    assert events[-2][1]["usage"]["output_tokens"] == usage["output_tokens"]

    status, data = request(served.address, "POST", MESSAGES + "/count_tokens", {"messages": USER, "system": system})
    assert status == 200 and data == {"input_tokens": len(prompt)}


def test_tool_use_and_thinking_blocks(tools_served, monkeypatch):
    tokenizer = tools_served.app.tokenizer
    use_script(monkeypatch, list("Paris first.</think>Checking. " + CALL), tokenizer)
    body = {"max_tokens": 50, "messages": [{"role": "user", "content": "Weather in Paris?"}], "tools": [WEATHER],
            "thinking": {"type": "enabled", "budget_tokens": 100}}
    status, data = request(tools_served.address, "POST", MESSAGES, body)
    assert status == 200, data
    thinking, text, tool = data["content"]
    assert thinking == {"type": "thinking", "thinking": "Paris first.", "signature": ""}
    assert text == {"type": "text", "text": "Checking. "}
    assert tool["type"] == "tool_use" and tool["name"] == "get_weather" and tool["input"] == {"city": "Paris"}
    assert data["stop_reason"] == "tool_use"

    status, raw = request(tools_served.address, "POST", MESSAGES, dict(body, stream=True))
    events = named_events(raw)
    starts = [p["content_block"] for n, p in events if n == "content_block_start"]
    assert [b["type"] for b in starts] == ["thinking", "text", "tool_use"]
    assert starts[2]["name"] == "get_weather" and starts[2]["input"] == {}
    by_index = {}
    for name, p in events:
        if name == "content_block_delta":
            by_index.setdefault(p["index"], []).append(p["delta"])
    assert "".join(d["thinking"] for d in by_index[0]) == "Paris first."
    assert "".join(d["text"] for d in by_index[1]) == "Checking. "
    assert json.loads("".join(d["partial_json"] for d in by_index[2])) == {"city": "Paris"}
    stops = [p["index"] for n, p in events if n == "content_block_stop"]
    assert stops == [0, 1, 2]
    assert [p for n, p in events if n == "message_delta"][0]["delta"]["stop_reason"] == "tool_use"


def test_stop_sequences(tools_served, monkeypatch):
    use_script(monkeypatch, ["</think>", "Sunny", " and END here"], tools_served.app.tokenizer)
    body = {"max_tokens": 50, "messages": USER, "stop_sequences": ["END"]}
    status, data = request(tools_served.address, "POST", MESSAGES, body)
    assert status == 200, data
    assert data["content"] == [{"type": "text", "text": "Sunny and "}]
    assert (data["stop_reason"], data["stop_sequence"]) == ("stop_sequence", "END")


def test_a_tool_conversation_becomes_its_openai_twin():
    history = [
        {"role": "user", "content": [{"type": "text", "text": "Weather in Paris?"}]},
        {"role": "assistant", "content": [
            {"type": "thinking", "thinking": "Use the tool.", "signature": "x"},
            {"type": "text", "text": "Checking."},
            {"type": "tool_use", "id": "t1", "name": "get_weather", "input": {"city": "Paris"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "sunny"},
                                     {"type": "text", "text": "And tomorrow?"}]},
    ]
    got = chat_body({"max_tokens": 5, "system": [{"type": "text", "text": "Be brief."}], "messages": history,
                     "tools": [WEATHER], "tool_choice": {"type": "tool", "name": "get_weather"},
                     "stop_sequences": ["x"], "temperature": 0.5, "thinking": {"type": "disabled"}})
    assert got == {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": "Checking.", "tool_calls": [
                {"id": "t1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
            {"role": "tool", "tool_call_id": "t1", "content": "sunny"},
            {"role": "user", "content": "And tomorrow?"},
        ],
        "max_tokens": 5, "temperature": 0.5, "stop": ["x"],
        "tools": [{"type": "function", "function": {
            "name": "get_weather", "parameters": WEATHER["input_schema"], "description": WEATHER["description"]}}],
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "chat_template_kwargs": {"enable_thinking": False},
    }


BAD = [
    ("no max_tokens", {"messages": USER}, 400, "'max_tokens' is required"),
    ("no messages", {"max_tokens": 5}, 400, "'messages' must be a non-empty list"),
    ("a system role in messages", {"max_tokens": 5, "messages": [{"role": "system", "content": "x"}]}, 400,
     'role "user" or "assistant"'),
    ("an image block", {"max_tokens": 5, "messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}}]}]}, 400,
     "'image' block is not supported"),
    ("tool_use in a user turn", {"max_tokens": 5, "messages": [{"role": "user", "content": [
        {"type": "tool_use", "id": "a", "name": "f", "input": {}}]}]}, 400, "'tool_use' block is not supported"),
    ("tool_use without input", {"max_tokens": 5, "messages": [{"role": "assistant", "content": [
        {"type": "tool_use", "id": "a", "name": "f"}]}]}, 400, "object input"),
    ("tool_result without id", {"max_tokens": 5, "messages": [{"role": "user", "content": [
        {"type": "tool_result", "content": "x"}]}]}, 400, "tool_use_id"),
    ("a server tool", {"max_tokens": 5, "messages": USER, "tools": [{"type": "web_search_20250305", "name": "w"}]},
     400, "custom tools"),
    ("tool_choice unknown", {"max_tokens": 5, "messages": USER, "tool_choice": {"type": "some"}}, 400,
     "'tool_choice' must be"),
    ("thinking unknown", {"max_tokens": 5, "messages": USER, "thinking": "yes"}, 400, "'thinking' must be"),
    ("stop_sequences a string", {"max_tokens": 5, "messages": USER, "stop_sequences": "x"}, 400,
     "'stop_sequences' must be a list"),
    ("system a number", {"max_tokens": 5, "messages": USER, "system": 3}, 400, "system must be"),
    ("max_tokens over the context", {"max_tokens": 10**6, "messages": USER}, 400, "context of"),
    ("NaN temperature", b'{"max_tokens": 5, "messages": [], "temperature": NaN}', 400, "NaN is not a JSON number"),
]


@pytest.mark.parametrize("name, body, status, message", BAD, ids=[b[0] for b in BAD])
def test_bad_messages_get_anthropic_errors(served, name, body, status, message):
    got, data = request(served.address, "POST", MESSAGES, body)
    assert got == status, data
    assert data["type"] == "error" and data["error"]["type"] == "invalid_request_error"
    assert message in data["error"]["message"], data
    status, data = request(served.address, "POST", MESSAGES, {"max_tokens": 2, "messages": USER})
    assert status == 200 and data["type"] == "message", data


def test_error_shapes_follow_the_endpoint(served):
    status, data = request(served.address, "POST", MESSAGES, {"messages": USER})
    assert status == 400 and data["type"] == "error" and data["error"]["type"] == "invalid_request_error"
    status, data = request(served.address, "POST", "/v1/chat/completions", {"messages": 3})
    assert status == 400 and data["error"]["param"] == "messages" and "type" not in data
    big = b'{"max_tokens": 5, "messages": []}'
    status, text = raw_http(served.address, b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999\r\n"
                            b"Connection: close\r\n\r\n" + big)
    assert status == 413 and json.loads(text)["error"]["type"] == "request_too_large"


@pytest.mark.parametrize("streamed", [False, True], ids=["whole", "streamed"])
def test_a_generation_that_fails_midway(served, loaded, monkeypatch, streamed):
    """An api_error (or a stream cut short of message_stop), then correct answers again."""
    from orthrus_mlx.backend import MLXBackend

    original, calls = MLXBackend.verify, []

    def failing(self, *args):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("injected failure in verify")
        return original(self, *args)

    messages = [{"role": "user", "content": f"Anthropic, {'streamed' if streamed else 'whole'}: and then?"}]
    body = {"max_tokens": 12, "messages": messages, "stream": streamed}
    monkeypatch.setattr(MLXBackend, "verify", failing)
    status, data = request(served.address, "POST", MESSAGES, body)
    monkeypatch.undo()
    if streamed:
        assert status == 200 and "message_stop" not in data
    else:
        assert status == 500 and data["error"] == {"type": "api_error",
                                                   "message": "Generation failed: injected failure in verify"}
    model, tokenizer = loaded
    want = generate(model, tokenizer, chat_prompt(tokenizer, messages, {}), max_tokens=12)
    status, data = request(served.address, "POST", MESSAGES, dict(body, stream=False))
    assert status == 200 and data["content"] == [{"type": "text", "text": want}]
