"""Shared by the server feature tests: a checkpoint whose tokenizer has thinking and tool-call
markers, an in-process server over an App, and scripted generations."""

import argparse
import json
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Dict, Iterator, List

from mlx_lm.generate import GenerationResponse

from orthrus_mlx.cli import server as server_module
from orthrus_mlx.cli.server import App, make_server
from orthrus_mlx.testing import random_checkpoint

MARKERS = ["<think>", "</think>", "<tool_call>", "</tool_call>"]
# Qwen3's habits in small: tools listed in a system turn, earlier calls rendered back as
# <tool_call> JSON (`tool_call.name`, from which mlx-lm picks its json_tools parser), and a
# generation prompt that opens a think block when thinking is on.
TOOLS_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\n# Tools\n{% for tool in tools %}{{ tool | tojson }}\n{% endfor %}"
    "{%- if tool_choice is defined %}choice: {{ tool_choice | tojson }}\n{% endif %}<|im_end|>\n{% endif %}"
    "{%- for message in messages %}<|im_start|>{{ message.role }}\n{{ message.content }}"
    "{%- if message.tool_calls %}{% for tool_call in message.tool_calls %}"
    "{%- if tool_call.function is defined %}{% set tool_call = tool_call.function %}{% endif %}"
    '<tool_call>{"name": "{{ tool_call.name }}", "arguments": {{ tool_call.arguments | tojson }}}</tool_call>'
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n"
    "{%- if enable_thinking is defined and enable_thinking %}<think>\n{% endif %}{% endif %}"
)


def add_markers(folder: Path, template: str = TOOLS_TEMPLATE) -> Path:
    """Give `folder`'s byte tokenizer the thinking and tool-call markers (ids 260-263) and `template`."""
    from tokenizers import AddedToken, Tokenizer

    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in MARKERS])
    tok.save(str(folder / "tokenizer.json"))
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = template
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def tools_checkpoint(folder: Path) -> Path:
    return add_markers(random_checkpoint(folder, seed=11))


def defaults(**overrides) -> argparse.Namespace:
    values = dict(temp=0.0, top_p=1.0, top_k=0, seed=None, max_tokens=32, system_prompt=None,
                  no_diffusion=False, block_size=4, prompt_cache_size=4)
    values.update(overrides)
    return argparse.Namespace(**values)


class Served:
    """An App on a free loopback port, serving from a thread; use as a context manager."""

    def __init__(self, model, tokenizer, template=None, **flags):
        self.app = App(model, tokenizer, "m", defaults(**flags), template)
        self.httpd = make_server(self.app, "127.0.0.1", 0)
        self.address = self.httpd.server_address[:2]

    def __enter__(self) -> "Served":
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        # No MLX work of this server may outlive the test: the next one runs MLX on this thread.
        assert self.httpd.stop(timeout=120), "a request handler was still running"


def scripted(pieces: List[str], tokenizer, finish: str = "stop"):
    """A stand-in for stream_generate whose answer is `pieces` of text, whatever the prompt."""

    def fake(model, tok, prompt, max_tokens=256, **kwargs) -> Iterator[GenerationResponse]:
        for i, text in enumerate(pieces):
            last = i == len(pieces) - 1
            token = (tokenizer.encode(text, add_special_tokens=False) or [0])[0]
            yield GenerationResponse(
                text=text, token=token, logprobs=None, from_draft=False, prompt_tokens=len(prompt),
                prompt_tps=0.0, generation_tokens=i + 1, generation_tps=0.0, peak_memory=0.0,
                finish_reason=finish if last else None,
            )

    return fake


def use_script(monkeypatch, pieces: List[str], tokenizer, finish: str = "stop") -> None:
    monkeypatch.setattr(server_module, "stream_generate", scripted(pieces, tokenizer, finish))


def sse(data: str) -> SimpleNamespace:
    """An SSE body's comment lines, JSON events, and whether it ended with [DONE]."""
    blocks = [b for b in data.split("\n\n") if b]
    comments = [b for b in blocks if b.startswith(":")]
    events = [b[len("data: "):] for b in blocks if b.startswith("data: ")]
    done = bool(events) and events[-1] == "[DONE]"
    return SimpleNamespace(
        comments=comments, events=[json.loads(e) for e in events if e != "[DONE]"], done=done, blocks=blocks
    )


def deltas(events: List[Dict]) -> Dict[str, object]:
    """A streamed chat answer put together: content, reasoning, tool calls, finish reason."""
    out = {"content": "", "reasoning": "", "tool_calls": [], "finish_reason": None}
    for e in events:
        if not e["choices"]:
            continue
        choice = e["choices"][0]
        delta = choice["delta"]
        out["content"] += delta.get("content") or ""
        out["reasoning"] += delta.get("reasoning") or ""
        out["tool_calls"] += delta.get("tool_calls") or []
        out["finish_reason"] = choice["finish_reason"] or out["finish_reason"]
    return out
