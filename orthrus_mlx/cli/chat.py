"""`orthrus-mlx chat`: a multi-turn conversation whose KV cache survives from turn to turn.

Each turn renders the whole history with the chat template, keeps the cached
prefix it shares with the previous turn and prefills only the rest.
On a terminal: `/reset`, `/stats`, `/quit`, Ctrl-C stops the current answer,
Ctrl-D ends. With stdin not a terminal, each line is one user message.
"""

import argparse
import itertools
import signal
import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional

from ..core.step import DecodeStats, check_context
from ..distributed import Group, broadcast_text, world
from ..generate import stream_generate
from ..prompt_cache import PromptCache
from .flags import (
    add_cache_arguments,
    add_chat_template_arguments,
    add_model_arguments,
    add_prompt_cache_file_argument,
    add_sampling_arguments,
    cache_kwargs,
    chat_prompt,
    check_cache_flags,
    command_policy,
    generation_kwargs,
    load_from_args,
    open_prompt_file,
    sampling_params,
    template_kwargs,
    with_system,
)
from .text_input import check_text, read_line

HELP = "/reset starts over, /stats shows the figures, /quit (or Ctrl-D) ends; Ctrl-C stops an answer."


@dataclass
class Turn:
    """The figures of one answer."""

    text: str = ""
    prompt_tokens: int = 0  # the whole rendered conversation
    prefilled: int = 0  # of which were not in the cache
    tokens: int = 0
    steps: int = 0
    prompt_tps: float = 0.0
    generation_tps: float = 0.0
    peak_memory: float = 0.0
    finish_reason: Optional[str] = None

    @property
    def cached(self) -> int:
        return self.prompt_tokens - self.prefilled

    def footer(self) -> str:
        per_step = self.tokens / max(1, self.steps)
        end = "stopped" if self.finish_reason is None else self.finish_reason
        return (
            f"[{self.prefilled} new prompt tokens ({self.cached} cached), {self.prompt_tps:.1f} tok/s"
            f" | {self.tokens} tokens, {self.steps} steps, {per_step:.2f} tokens/step,"
            f" {self.generation_tps:.1f} tok/s | {end} | {self.peak_memory:.3f} GB]"
        )


@dataclass
class ChatSession:
    """The history, its KV cache, and the generation options of a conversation."""

    model: Any
    tokenizer: Any
    max_tokens: int
    generation: Dict[str, Any]
    template: Dict[str, Any] = field(default_factory=dict)
    system_prompt: Optional[str] = None
    messages: List[Dict[str, str]] = field(default_factory=list)
    turns: List[Turn] = field(default_factory=list)
    document: str = ""  # a --prompt-cache-file's text: the start of the first user message

    def __post_init__(self):
        self.cache = PromptCache(self.model, self.generation.get("max_kv_size"))
        self.context = self.model.args.max_position_embeddings

    def reset(self) -> None:
        self.messages, self.turns = [], []
        self.cache.reset()

    def reply(
        self, message: str, should_stop: Callable[[], bool] = lambda: False
    ) -> Iterator[str]:
        """Stream the answer's text; its figures are `self.turns[-1]` once the stream ends."""
        content = self.document + message if not self.messages else message
        messages = self.messages + [{"role": "user", "content": content}]
        prompt = chat_prompt(self.tokenizer, with_system(self.system_prompt, messages), self.template)
        try:
            check_context(len(prompt), 1, self.context)  # room for one token at least
        except ValueError as e:
            raise ValueError(f"{e} /reset to start over.")
        room = self.context - len(prompt)
        new = self.cache.prepare(prompt)
        turn = Turn(prompt_tokens=len(prompt), prefilled=len(new))
        stats, emitted = DecodeStats(), []
        responses = stream_generate(
            self.model,
            self.tokenizer,
            new,
            max_tokens=min(self.max_tokens, room),
            prompt_cache=self.cache.cache,
            history=prompt[: len(prompt) - len(new)],  # processors see the whole conversation
            stats=stats,
            **self.generation,
        )
        try:
            for r in responses:
                emitted.append(r.token)
                turn.text += r.text
                turn.tokens, turn.steps = r.generation_tokens, r.steps
                turn.prompt_tps, turn.generation_tps = r.prompt_tps, r.generation_tps
                turn.peak_memory, turn.finish_reason = r.peak_memory, r.finish_reason
                yield r.text
                if should_stop():
                    break
        finally:
            responses.close()
            self.cache.commit(prompt, emitted)
            self.messages = messages + [{"role": "assistant", "content": turn.text}]
            self.turns.append(turn)

    def summary(self) -> str:
        prefilled = sum(t.prefilled for t in self.turns)
        prompts = sum(t.prompt_tokens for t in self.turns)
        tokens = sum(t.tokens for t in self.turns)
        steps = sum(t.steps for t in self.turns)
        return (
            f"[{len(self.turns)} turns, {len(self.cache)} tokens in the cache"
            f" | prefilled {prefilled} of {prompts} prompt tokens"
            f" | generated {tokens} tokens in {steps} steps, {tokens / max(1, steps):.2f} tokens/step]"
        )


@contextmanager
def ctrl_c_flag() -> Iterator[threading.Event]:
    """Ctrl-C sets a flag instead of raising, so an answer stops between tokens, cache intact."""
    flag = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    previous = signal.signal(signal.SIGINT, lambda signum, frame: flag.set())
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)


def read_message(interactive: bool, what: str) -> Optional[str]:
    """The next user message; None at end of input (Ctrl-D). ValueError for text that is not UTF-8."""
    if not interactive:
        return read_line(sys.stdin, what)
    while True:
        try:
            return check_text(input(">> "), what)
        except EOFError:
            print()
            return None
        except KeyboardInterrupt:  # Ctrl-C at the prompt clears the line, as in a shell
            print()


def next_message(interactive: bool, what: str, group: Group) -> Optional[str]:
    """`read_message` on rank 0, sent to every rank: under `mlx.launch` all ranks answer it."""
    if group.size() == 1:
        return read_message(interactive, what)
    return broadcast_text(read_message(interactive, what) if group.rank() == 0 else None, group)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    add_chat_template_arguments(parser)
    add_sampling_arguments(parser, max_tokens=512)
    add_cache_arguments(parser)
    add_prompt_cache_file_argument(parser)


def run(args: argparse.Namespace) -> int:
    sampling_params(args)
    cache_kwargs(args)
    template = template_kwargs(args)
    check_text(args.system_prompt, "--system-prompt")
    model, tokenizer = load_from_args(args)
    check_cache_flags(model, args)
    session = ChatSession(
        model,
        tokenizer,
        max_tokens=args.max_tokens,
        generation=generation_kwargs(args, command_policy(model, args)),
        template=template,
        system_prompt=args.system_prompt,
    )
    cached = open_prompt_file(model, args)
    if cached is not None:
        session.cache.cache, session.cache.tokens, session.document = cached.cache, cached.tokens, cached.text
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"[{HELP}]")
    group = world()
    for line in itertools.count(1):
        try:
            message = next_message(interactive, f"Input line {line}", group)
        except ValueError as e:  # that line is reported and skipped; the conversation goes on
            print(f"[error: {e}]", flush=True)
            continue
        if message is None or message.strip() == "/quit":
            break
        if group.size() > 1:  # an answer stopped on one rank only would leave the others waiting
            respond(session, message, threading.Event())
            continue
        try:
            # Ctrl-C anywhere in a turn only sets the flag: the answer stops, the session stays.
            with ctrl_c_flag() as stop:
                respond(session, message, stop)
        except KeyboardInterrupt:  # in the instant between reading and the flag's handler
            print()
    return 0


def respond(session: ChatSession, message: str, stop: threading.Event) -> None:
    """Run one line of input: a command, or a message to answer with its footer."""
    command = message.strip()
    if not command:
        return
    if command == "/reset":
        session.reset()
        print("[conversation reset]", flush=True)
    elif command == "/stats":
        print(session.summary(), flush=True)
    elif command in ("/help", "/?"):
        print(f"[{HELP}]", flush=True)
    else:
        try:
            for text in session.reply(message, should_stop=stop.is_set):
                print(text, end="", flush=True)
        except ValueError as e:
            print(f"[error: {e}]", flush=True)
            return
        print()
        print(session.turns[-1].footer(), flush=True)
