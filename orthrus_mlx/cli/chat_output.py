"""A chat answer's text split as it streams: content, reasoning (`<think>`) and tool calls.

The markers and parsers are mlx-lm's: its TokenizerWrapper finds a model's thinking and
tool-call markers and its tool parser (`mlx_lm/tool_parsers/`), and its TextStateMachine
strips the markers from text as it arrives. What reaches a client matches mlx_lm.server:
reasoning in a `reasoning` field, calls in `tool_calls`, finish reason "tool_calls".
"""

import logging
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

from mlx_lm.generate import TextStateMachine, make_text_state_machine
from mlx_lm.server import ToolCallFormatter

log = logging.getLogger("orthrus_mlx.server")


def initial_state(tokenizer, prompt: Sequence[int]) -> str:
    """"reasoning" when the prompt leaves a think block open (a template that starts the
    answer with `<think>`), else "normal": mlx_lm.server's rule."""
    state = "normal"
    if tokenizer.has_thinking and tokenizer.rfind_think_start(prompt) > tokenizer.rfind_think_end(prompt):
        state = "reasoning"
    return tokenizer.response_initial_state or state


@dataclass
class Delta:
    """What a piece of text added to each part of the answer; `parts` the same in the order
    written, as ("reasoning" | "content", text) and ("tool_call", call) pairs."""

    content: str = ""
    reasoning: str = ""
    tool_calls: List[Dict[str, Any]] = field(default_factory=list)
    parts: List[Tuple[str, Any]] = field(default_factory=list)

    def add(self, kind: str, value: Any) -> None:
        if kind == "tool_call":
            self.tool_calls.append(value)
        elif not value:
            return
        elif kind == "reasoning":
            self.reasoning += value
        else:
            self.content += value
        if kind != "tool_call" and self.parts and self.parts[-1][0] == kind:
            self.parts[-1] = (kind, self.parts[-1][1] + value)
        else:
            self.parts.append((kind, value))

    def __bool__(self) -> bool:
        return bool(self.content or self.reasoning or self.tool_calls)


class ChatOutput:
    """Feed the answer's text as it streams; each `feed` returns what is now safe to send.

    Text that may be part of a marker is held back until it is known not to be. A tool
    call's text is sent only once whole, parsed; a call the parser cannot read is given
    back as content, markers and all, never dropped.
    """

    def __init__(self, tokenizer, prompt: Sequence[int], tools: Optional[List[Any]] = None, streaming: bool = False):
        self.machine = make_text_state_machine(tokenizer)
        self.state = self.machine.make_state(initial_state(tokenizer, prompt))
        self.current = self.state[0]
        self.tool_text = ""
        self.tokenizer = tokenizer
        self.formatter = (
            ToolCallFormatter(tokenizer.tool_parser, tools, streaming) if tokenizer.tool_parser is not None else None
        )
        self.made_tool_call = False

    def feed(self, text: str, final: bool = False) -> Delta:
        """The parts of `text` safe to send; with `final`, also everything held back."""
        self.state, segments = TextStateMachine.split(self.state, text)
        if final:
            self.state, rest, name = TextStateMachine.flush(self.state)
            segments.append((name, rest))
        delta = Delta()
        for name, piece in segments:
            if name == "reasoning":
                delta.add("reasoning", piece)
            elif name == "tool":
                self.tool_text += piece
            elif name == "normal":
                if self.current == "tool":
                    self._end_tool_call(delta, closed=True)
                delta.add("content", piece)
            self.current = name
        if final and self.current == "tool" and self.tool_text:  # a call cut off, or one with no end marker
            self._end_tool_call(delta, closed=False)
        return delta

    def _end_tool_call(self, delta: Delta, closed: bool) -> None:
        text, self.tool_text = self.tool_text, ""
        calls = []
        if self.formatter is not None:
            try:
                calls = self.formatter([text])
            except Exception as e:  # a parser that trips over what the model wrote
                log.warning("could not parse a tool call (%s: %s)", type(e).__name__, e)
        if calls:
            for c in calls:
                delta.add("tool_call", c)
            self.made_tool_call = True
        else:
            end = (self.tokenizer.tool_call_end or "") if closed else ""
            delta.add("content", f"{self.tokenizer.tool_call_start}{text}{end}")

    def finish_reason(self, finish: Optional[str]) -> Optional[str]:
        """mlx_lm.server's: an answer that made a call and then stopped finished with "tool_calls"."""
        return "tool_calls" if finish == "stop" and self.made_tool_call else finish
