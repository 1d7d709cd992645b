"""Tool calls and reasoning in chat answers: mlx-lm's markers and parsers, whole and streamed.

What the tiny model writes is no test of parsing, so the answers here are scripted texts fed
through the server's real path (stop strings, splitting, HTTP shapes); one real generation
proves that `tools` and `tool_choice` reach the chat template."""

import json

import pytest
from mlx_lm.utils import load_tokenizer

from http_helpers import request
from orthrus_mlx import load
from orthrus_mlx.cli.chat_output import ChatOutput
from orthrus_mlx.cli.flags import chat_text
from server_fixtures import Served, deltas, sse, tools_checkpoint, use_script

CHAT = "/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tools_checkpoint(tmp_path_factory.mktemp("tools-model"))


@pytest.fixture(scope="module")
def tokenizer(folder):
    return load_tokenizer(folder)


@pytest.fixture(scope="module")
def served(folder):
    model, tokenizer = load(folder)
    with Served(model, tokenizer) as s:
        yield s


def splits(text):
    """`text` whole, one character at a time, and cut in two at every point."""
    yield [text]
    yield list(text)
    for i in range(1, len(text)):
        yield [text[:i], text[i:]]


def parse(tokenizer, pieces, prompt=(), tools=None):
    output = ChatOutput(tokenizer, list(prompt), tools, streaming=True)
    parts = [output.feed(p) for p in pieces] + [output.feed("", final=True)]
    calls = [c for p in parts for c in p.tool_calls]
    for c in calls:
        c.pop("id")
    return ("".join(p.content for p in parts), "".join(p.reasoning for p in parts), calls,
            output.finish_reason("stop"))


def call(name, arguments, index):
    return {"function": {"name": name, "arguments": json.dumps(arguments)}, "type": "function", "index": index}


CASES = [
    ("plain", "Sunny, 20 degrees.", ("Sunny, 20 degrees.", "", [], "stop")),
    ("think then answer", "<think>Look it up.</think>It is sunny.", ("It is sunny.", "Look it up.", [], "stop")),
    ("a call", "Checking. " + CALL, ("Checking. ", "", [call("get_weather", {"city": "Paris"}, 0)], "tool_calls")),
    ("two calls after thinking", "<think>Two cities.</think>" + CALL + CALL.replace("Paris", "Rome"),
     ("", "Two cities.", [call("get_weather", {"city": "Paris"}, 0), call("get_weather", {"city": "Rome"}, 1)],
      "tool_calls")),
    ("a call it cannot parse", "<tool_call>{not json</tool_call> done",
     ("<tool_call>{not json</tool_call> done", "", [], "stop")),
    ("a call cut off", '<tool_call>{"name": "get_weather", "argu',
     ('<tool_call>{"name": "get_weather", "argu', "", [], "stop")),
    ("marker look-alikes", "a <tool b </thin c <thinking>", ("a <tool b </thin c <thinking>", "", [], "stop")),
]


@pytest.mark.parametrize("name, text, want", CASES, ids=[c[0] for c in CASES])
def test_parsing_does_not_depend_on_how_the_text_arrives(tokenizer, name, text, want):
    for pieces in splits(text):
        assert parse(tokenizer, pieces) == want, pieces


def test_a_prompt_that_opens_a_think_block_starts_in_reasoning(tokenizer):
    prompt = tokenizer.encode(chat_text(tokenizer, MESSAGES, {"enable_thinking": True}), add_special_tokens=False)
    assert parse(tokenizer, ["Hmm, Paris.</think>Sunny."], prompt) == ("Sunny.", "Hmm, Paris.", [], "stop")
    prompt = tokenizer.encode(chat_text(tokenizer, MESSAGES, {"enable_thinking": False}), add_special_tokens=False)
    assert parse(tokenizer, ["Sunny."], prompt) == ("Sunny.", "", [], "stop")


def test_whole_answer_with_reasoning_and_a_tool_call(served, tokenizer, monkeypatch):
    use_script(monkeypatch, ["<think>", "Need the", " weather.", "</think>", "Let me check.", CALL[:20], CALL[20:]],
               tokenizer)
    body = {"messages": MESSAGES, "tools": [WEATHER], "chat_template_kwargs": {"enable_thinking": False}}
    status, data = request(served.address, "POST", CHAT, body)
    assert status == 200, data
    choice = data["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    message = choice["message"]
    assert message["content"] == "Let me check." and message["reasoning"] == "Need the weather."
    [tool_call] = message["tool_calls"]
    assert tool_call["type"] == "function" and tool_call["id"]
    assert tool_call["function"]["name"] == "get_weather"
    assert json.loads(tool_call["function"]["arguments"]) == {"city": "Paris"}


def test_streamed_answer_with_reasoning_and_tool_calls(served, tokenizer, monkeypatch):
    """Thinking on (the template's default here): the prompt opens the think block."""
    text = "Two cities.</think>" + CALL + CALL.replace("Paris", "Rome")
    use_script(monkeypatch, list(text), tokenizer)  # a character per token: markers arrive in bits
    status, data = request(served.address, "POST", CHAT, {"messages": MESSAGES, "tools": [WEATHER], "stream": True})
    assert status == 200, data
    body = sse(data)
    assert body.done
    got = deltas(body.events)
    assert got["reasoning"] == "Two cities." and got["content"] == ""
    assert [c["index"] for c in got["tool_calls"]] == [0, 1]
    assert [json.loads(c["function"]["arguments"])["city"] for c in got["tool_calls"]] == ["Paris", "Rome"]
    assert got["finish_reason"] == "tool_calls"
    # No event carries a marker, nor a piece of a call's JSON as content.
    assert not any("<" in json.dumps(e) for e in body.events)


def test_stop_strings_still_cut_a_scripted_answer(served, tokenizer, monkeypatch):
    use_script(monkeypatch, ["a</think>", "Sunny", " END of it"], tokenizer)
    status, data = request(served.address, "POST", CHAT, {"messages": MESSAGES, "stop": ["END"]})
    assert status == 200, data
    assert data["choices"][0]["message"] == {"role": "assistant", "content": "Sunny ", "reasoning": "a"}
    assert data["choices"][0]["finish_reason"] == "stop"


def test_tools_and_tool_choice_reach_the_template(served, tokenizer):
    """A real generation: the prompt the server counts is the template's rendering with the tools."""
    choice = {"type": "function", "function": {"name": "get_weather"}}
    history = MESSAGES + [
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
    ]
    body = {"messages": history, "tools": [WEATHER], "tool_choice": choice, "max_tokens": 2}
    status, data = request(served.address, "POST", CHAT, body)
    assert status == 200, data
    rendered = chat_text(tokenizer, [dict(m, tool_calls=[
        {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}])
        if m.get("tool_calls") else m for m in history], {}, tools=[WEATHER], tool_choice=choice)
    assert '"name": "get_weather"' in rendered and 'choice: {"type"' in rendered
    assert '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>' in rendered
    assert data["usage"]["prompt_tokens"] == len(tokenizer.encode(rendered, add_special_tokens=False))
    status, plain = request(served.address, "POST", CHAT, {"messages": MESSAGES, "max_tokens": 2})
    assert plain["usage"]["prompt_tokens"] < data["usage"]["prompt_tokens"]


BAD = [
    ("tools not a list", {"tools": {"a": 1}}, "'tools' must be a list"),
    ("tool without a name", {"tools": [{"type": "function", "function": {}}]}, "'tools' must be a list"),
    ("tool of another type", {"tools": [{"type": "retrieval", "function": {"name": "x"}}]}, "'tools'"),
    ("tool parameters not an object", {"tools": [{"type": "function", "function": {"name": "x", "parameters": 3}}]},
     "'tools'"),
    ("tool_choice unknown", {"tool_choice": "always"}, "'tool_choice' must be"),
    ("tool_choice object without a name", {"tool_choice": {"type": "function"}}, "'tool_choice' must be"),
    ("tool_calls not a list", {"messages": [{"role": "assistant", "content": "", "tool_calls": "x"}]},
     "tool_calls must be a list"),
    ("tool call arguments not JSON", {"messages": [{"role": "assistant", "tool_calls": [
        {"function": {"name": "f", "arguments": "{oops"}}]}]}, "'arguments' must be a JSON object"),
    ("tool call arguments NaN", {"messages": [{"role": "assistant", "tool_calls": [
        {"function": {"name": "f", "arguments": '{"a": NaN}'}}]}]}, "'arguments' must be a JSON object"),
    ("tool call arguments nested deep", {"messages": [{"role": "assistant", "tool_calls": [
        {"function": {"name": "f", "arguments": '{"a": ' + "[" * 100000 + "]" * 100000 + "}"}}]}]},
     "'arguments' must be a JSON object"),
    ("tool call arguments a list", {"messages": [{"role": "assistant", "tool_calls": [
        {"function": {"name": "f", "arguments": "[1]"}}]}]}, "'arguments' must be a JSON object"),
    ("tool_call_id not a string", {"messages": [{"role": "tool", "content": "x", "tool_call_id": 5}]},
     "tool_call_id must be a string"),
]


@pytest.mark.parametrize("name, fields, message", BAD, ids=[b[0] for b in BAD])
def test_bad_tool_fields_get_400_and_the_server_keeps_serving(served, name, fields, message):
    status, data = request(served.address, "POST", CHAT, dict({"messages": MESSAGES, "max_tokens": 2}, **fields))
    assert status == 400, data
    assert message in data["error"]["message"] and data["error"]["type"] == "invalid_request_error"
    status, data = request(served.address, "POST", CHAT, {"messages": MESSAGES, "max_tokens": 2})
    assert status == 200, data


def test_openai_client_reads_tool_calls_whole_and_streamed(served, tokenizer, monkeypatch):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"http://{served.address[0]}:{served.address[1]}/v1", api_key="x", max_retries=0)
    text = "Two cities.</think>" + CALL + CALL.replace("Paris", "Rome")
    use_script(monkeypatch, list(text), tokenizer)
    answer = client.chat.completions.create(model="m", messages=MESSAGES, tools=[WEATHER])
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert [json.loads(c.function.arguments)["city"] for c in choice.message.tool_calls] == ["Paris", "Rome"]
    assert choice.message.model_extra["reasoning"] == "Two cities."
    calls = {}
    for chunk in client.chat.completions.create(model="m", messages=MESSAGES, tools=[WEATHER], stream=True):
        for call in chunk.choices[0].delta.tool_calls or []:
            calls.setdefault(call.index, "")
            calls[call.index] += call.function.arguments
        finish = chunk.choices[0].finish_reason or None
    assert [json.loads(a)["city"] for _, a in sorted(calls.items())] == ["Paris", "Rome"]
    assert finish == "tool_calls"


def test_a_parser_that_raises_gives_the_text_back(tokenizer):
    from mlx_lm.server import ToolCallFormatter

    def broken(text, tools):
        raise KeyError("name")

    output = ChatOutput(tokenizer, [], None)
    output.formatter = ToolCallFormatter(broken, None)
    delta = output.feed("a" + CALL + "b", final=True)
    assert (delta.content, delta.tool_calls, output.finish_reason("stop")) == ("a" + CALL + "b", [], "stop")
