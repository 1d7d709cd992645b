"""Anthropic's Messages API (`POST /v1/messages`) over the server's chat path.

A Messages request becomes the equivalent OpenAI chat request (so every check of the chat
path applies), and the chat answer's parts (chat_output.Delta) become a message's content
blocks, or its stream of events: message_start, content_block_start / _delta / _stop per
block (thinking, text, tool_use), message_delta, message_stop.
"""

import json
import uuid
from typing import Any, Callable, Dict, List, Optional

from .errors import RequestError

ROLES = ("user", "assistant")
TOOL_CHOICES = {"auto": "auto", "any": "required", "none": "none"}
ERROR_TYPES = {404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error"}


def error_body(status: int, message: str) -> Dict[str, Any]:
    kind = "api_error" if status >= 500 else ERROR_TYPES.get(status, "invalid_request_error")
    return {"type": "error", "error": {"type": kind, "message": message}}


def _text(value: Any, where: str) -> str:
    """A string, or a list of text blocks, as one string."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(
        isinstance(b, dict) and b.get("type") == "text" and isinstance(b.get("text"), str) for b in value
    ):
        return "".join(b["text"] for b in value)
    raise RequestError(f"{where} must be a string or a list of text blocks", param=where)


def _blocks(message: Dict[str, Any], i: int) -> List[Dict[str, Any]]:
    content = message.get("content")
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list) or not all(isinstance(b, dict) and isinstance(b.get("type"), str)
                                                for b in content):
        raise RequestError(f"messages[{i}].content must be a string or a list of content blocks", param="messages")
    return content


def _message(message: Any, i: int) -> List[Dict[str, Any]]:
    """One Messages turn as chat-template messages: tool results become `tool` turns, tool
    uses an assistant's `tool_calls`; thinking blocks of earlier turns are left out."""
    if not isinstance(message, dict) or message.get("role") not in ROLES:
        raise RequestError(f"messages[{i}] must be an object with role \"user\" or \"assistant\"", param="messages")
    role, text, calls, out = message["role"], "", [], []
    for block in _blocks(message, i):
        kind, where = block["type"], f"messages[{i}].content"
        if kind == "text" and isinstance(block.get("text"), str):
            text += block["text"]
        elif kind in ("thinking", "redacted_thinking") and role == "assistant":
            continue
        elif kind == "tool_use" and role == "assistant":
            if not (isinstance(block.get("id"), str) and isinstance(block.get("name"), str)
                    and isinstance(block.get("input"), dict)):
                raise RequestError(f"{where}: a tool_use block needs a string id and name and an object input",
                                   param="messages")
            calls.append({"id": block["id"], "type": "function",
                          "function": {"name": block["name"], "arguments": block["input"]}})
        elif kind == "tool_result" and role == "user":
            if not isinstance(block.get("tool_use_id"), str):
                raise RequestError(f"{where}: a tool_result block needs a string tool_use_id", param="messages")
            result = _text(block.get("content", ""), f"{where}[tool_result].content")
            out.append({"role": "tool", "tool_call_id": block["tool_use_id"], "content": result})
        else:
            raise RequestError(f"{where}: a {kind!r} block is not supported in a {role} turn", param="messages")
    if text or calls or not out:
        turn: Dict[str, Any] = {"role": role, "content": text}
        if calls:
            turn["tool_calls"] = calls
        out.append(turn)
    return out


def _tools(tools: Any) -> List[Dict[str, Any]]:
    if not isinstance(tools, list):
        raise RequestError("'tools' must be a list", param="tools")
    out = []
    for tool in tools:
        if not (isinstance(tool, dict) and tool.get("type", "custom") == "custom" and isinstance(tool.get("name"), str)
                and isinstance(tool.get("input_schema", {}), dict)
                and isinstance(tool.get("description", ""), str)):
            raise RequestError(
                "'tools' entries must be custom tools: {\"name\": ..., \"description\": ..., \"input_schema\": {...}}",
                param="tools",
            )
        function = {"name": tool["name"], "parameters": tool.get("input_schema", {})}
        if "description" in tool:
            function["description"] = tool["description"]
        out.append({"type": "function", "function": function})
    return out


def _tool_choice(choice: Any) -> Any:
    if isinstance(choice, dict) and choice.get("type") in TOOL_CHOICES:
        return TOOL_CHOICES[choice["type"]]
    if isinstance(choice, dict) and choice.get("type") == "tool" and isinstance(choice.get("name"), str):
        return {"type": "function", "function": {"name": choice["name"]}}
    raise RequestError("'tool_choice' must be {\"type\": \"auto\" | \"any\" | \"none\"} or "
                       "{\"type\": \"tool\", \"name\": ...}", param="tool_choice")


def chat_body(body: Dict[str, Any]) -> Dict[str, Any]:
    """The OpenAI chat request equivalent to a Messages request `body`; RequestError if bad."""
    if body.get("max_tokens") is None:
        raise RequestError("'max_tokens' is required", param="max_tokens")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty list", param="messages")
    turns: List[Dict[str, Any]] = []
    if body.get("system") is not None:
        turns.append({"role": "system", "content": _text(body["system"], "system")})
    for i, m in enumerate(messages):
        turns.extend(_message(m, i))
    out: Dict[str, Any] = {"messages": turns}
    for name in ("max_tokens", "temperature", "top_p", "top_k", "stream"):
        if name in body:
            out[name] = body[name]
    stops = body.get("stop_sequences")
    if stops is not None:
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise RequestError("'stop_sequences' must be a list of strings", param="stop_sequences")
        out["stop"] = stops
    if body.get("tools"):
        out["tools"] = _tools(body["tools"])
    if body.get("tool_choice") is not None:
        out["tool_choice"] = _tool_choice(body["tool_choice"])
    thinking = body.get("thinking")
    if thinking is not None:
        if not isinstance(thinking, dict) or thinking.get("type") not in ("enabled", "disabled"):
            raise RequestError("'thinking' must be {\"type\": \"enabled\" | \"disabled\", ...}", param="thinking")
        out["chat_template_kwargs"] = {"enable_thinking": thinking["type"] == "enabled"}
    return out


def tool_use(call: Dict[str, Any]) -> Dict[str, Any]:
    """A parsed call (OpenAI's shape, arguments a JSON string) as a tool_use block."""
    function = call["function"]
    arguments = json.loads(function["arguments"])
    if not isinstance(arguments, dict):  # Anthropic's input is an object
        arguments = {"value": arguments}
    return {"type": "tool_use", "id": call.get("id") or f"toolu_{uuid.uuid4().hex}", "name": function["name"],
            "input": arguments}


def content_blocks(parts: List[Any]) -> List[Dict[str, Any]]:
    blocks = []
    for kind, value in parts:
        if kind == "reasoning":
            blocks.append({"type": "thinking", "thinking": value, "signature": ""})
        elif kind == "content":
            blocks.append({"type": "text", "text": value})
        else:
            blocks.append(tool_use(value))
    return blocks


def stop_reason(finish: Optional[str], stop: Optional[str], made_tool_call: bool) -> str:
    if finish == "length":
        return "max_tokens"
    if stop is not None:
        return "stop_sequence"
    return "tool_use" if made_tool_call else "end_turn"


def message(rid: str, model: str, blocks: List[Dict[str, Any]], reason: Optional[str], stop: Optional[str],
            usage: Dict[str, Any]) -> Dict[str, Any]:
    return {
        "id": rid, "type": "message", "role": "assistant", "model": model, "content": blocks,
        "stop_reason": reason, "stop_sequence": stop,
        "usage": message_usage(usage),
    }


def message_usage(usage: Dict[str, Any]) -> Dict[str, int]:
    """Anthropic's counts: `input_tokens` are those prefilled, cached ones counted apart."""
    cached = usage.get("prompt_tokens_details", {}).get("cached_tokens", 0)
    return {"input_tokens": usage.get("prompt_tokens", 0) - cached, "cache_read_input_tokens": cached,
            "output_tokens": usage.get("completion_tokens", 0)}


class Events:
    """A streamed message's content events, from the chat answer's parts as they come.

    `send(name, payload)` writes one SSE event. Thinking and text arrive in pieces, each
    run one block; a tool call arrives whole: one tool_use block with its input as one
    input_json_delta.
    """

    def __init__(self, send: Callable[[str, Dict[str, Any]], None]):
        self.send = send
        self.index = -1
        self.open: Optional[str] = None  # the kind of the block still open

    def start(self, block: Dict[str, Any]) -> None:
        self.index += 1
        self.send("content_block_start", {"type": "content_block_start", "index": self.index, "content_block": block})

    def delta(self, delta: Dict[str, Any]) -> None:
        self.send("content_block_delta", {"type": "content_block_delta", "index": self.index, "delta": delta})

    def close(self) -> None:
        if self.open is not None:
            self.send("content_block_stop", {"type": "content_block_stop", "index": self.index})
            self.open = None

    def feed(self, parts: List[Any]) -> None:
        for kind, value in parts:
            if kind == "tool_call":
                self.close()
                block = tool_use(value)
                self.start(dict(block, input={}))
                self.delta({"type": "input_json_delta", "partial_json": json.dumps(block["input"])})
                self.open = "tool_call"
                self.close()
                continue
            if self.open != kind:
                self.close()
                empty = {"type": "thinking", "thinking": "", "signature": ""} if kind == "reasoning" else \
                    {"type": "text", "text": ""}
                self.start(empty)
                self.open = kind
            if kind == "reasoning":
                self.delta({"type": "thinking_delta", "thinking": value})
            else:
                self.delta({"type": "text_delta", "text": value})
