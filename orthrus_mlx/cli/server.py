"""`orthrus-mlx server`: OpenAI-compatible HTTP over one model, one request at a time.

POST /v1/chat/completions and /v1/completions (SSE streaming or not), Anthropic's
/v1/messages (anthropic.py), GET /v1/models and /health. Requests generate one at a time
in arrival order, all on one model thread (see OnOneThread); a small pool of prompt caches
keeps each conversation's prefix, so a request prefills only what is new. As in
mlx_lm.server: `logprobs`/`top_logprobs` (the base model's), `tools` rendered by the chat
template and calls parsed into `tool_calls`, thinking in a `reasoning` field
(chat_output.py), CORS headers, and keep-alive comments while a streamed prompt prefills.

What a client sends is bounded before any work: a body of at most MAX_BODY_BYTES, finite
numbers, integers of at most 20 digits, only the chat template variables of
`flags.TEMPLATE_VARIABLES` plus checked `tools`/`tool_choice` (never a template of its
own, so rendering the model's template takes time linear in the body), a rendered prompt
of at most MAX_PROMPT_CHARS characters and a token count that fits the context. A
generation that fails drops the prompt cache it used, so no failure reaches a later
request.

Under `mlx.launch` (a model sharded over the ranks) rank 0 serves HTTP and every other rank
follows each of its generations pass for pass (`App.follow`), still one request at a time:
`--decode-concurrency` and `--prompt-cache-dir` are refused there.
"""

import argparse
import contextlib
import json
import logging
import math
import queue
import signal
import socket
import sys
import threading
import time
import traceback
import uuid
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import asdict, dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, NamedTuple, Optional, Tuple

import mlx.core as mx

from ..core.sampling import SamplingParams
from ..core.step import DecodeStats, check_context
from ..distributed import broadcast_bytes, model_group, world
from ..generate import add_special_tokens, stream_generate
from ..loader import DEFAULT_MODEL
from ..prompt_cache import PromptCachePool
from ..prompt_disk import DiskTier
from . import anthropic
from .chat_output import ChatOutput
from .errors import RequestError
from .flags import (
    PROCESSING,
    add_cache_arguments,
    add_chat_template_arguments,
    add_model_arguments,
    add_sampling_arguments,
    cache_kwargs,
    chat_text,
    check_cache_flags,
    check_template_args,
    command_block_size,
    command_policy,
    generation_kwargs,
    load_from_args,
    processing_kwargs,
    sampling_params,
    template_kwargs,
    with_system,
)

MAX_BODY_BYTES = 1 << 20
# A template of the model's own renders a body of MAX_BODY_BYTES to about as many
# characters; twice that leaves room for its markup and still encodes in about a second.
MAX_PROMPT_CHARS = 2 * MAX_BODY_BYTES
# Longer integer literals are refused as they are parsed: no field takes one (a seed is
# < 2**64, 20 digits), an int beyond int64 is no MLX scalar, and Python's int() of a long
# digit string is slow, then a ValueError.
MAX_INT_DIGITS = 20
DISK_BYTES = 10 * 10**9
LISTEN_BACKLOG = 128  # connections the kernel holds while we accept; bursts of clients get no resets
MAX_TOP_LOGPROBS = 20  # OpenAI's bound
KEEPALIVE_POLL_S = 1.0  # how often a streaming handler waiting on the model looks for prefill progress
MESSAGES_PATHS = ("/v1/messages", "/v1/messages/count_tokens")  # Anthropic's
DISCONNECTS = (BrokenPipeError, ConnectionResetError, ConnectionAbortedError, TimeoutError)
log = logging.getLogger("orthrus_mlx.server")


class ModelThread:
    """A one-thread executor whose thread is a daemon: a thread that ran MLX work must not end
    before the process does (MLX's per-thread state then aborts it at exit: "terminate called
    without an active exception"), and a daemon thread is not joined at exit."""

    def __init__(self):
        self.jobs: "queue.SimpleQueue" = queue.SimpleQueue()
        threading.Thread(target=self._run, name="orthrus-mlx-model", daemon=True).start()

    def submit(self, fn, *args, **kwargs) -> Future:
        future: Future = Future()
        self.jobs.put((future, fn, args, kwargs))
        return future

    def drain(self) -> None:
        """Wait until every job submitted so far has run; the thread stays, idle."""
        self.submit(lambda: None).result()

    def _run(self) -> None:
        while True:
            future, fn, args, kwargs = self.jobs.get()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args, **kwargs))
            except BaseException as e:
                future.set_exception(e)


class FifoLock:
    """A lock handed out in the order it was asked for (threading.Lock promises no order)."""

    def __init__(self):
        self._cond = threading.Condition()
        self._next_ticket = self._serving = 0

    def __enter__(self):
        with self._cond:
            ticket = self._next_ticket
            self._next_ticket += 1
            self._cond.wait_for(lambda: self._serving == ticket)

    def __exit__(self, *exc):
        with self._cond:
            self._serving += 1
            self._cond.notify_all()


class OnOneThread:
    """An iterator whose every step (and close) runs on `executor`'s single thread.

    MLX gives each thread a stream of its own, evaluates a graph only on the stream that
    built it, and keeps a finished thread's stream (about 100 KB each, MLX 0.32): so the
    model runs on one long-lived thread, never on a connection's.

    `on_wait`, if given, runs on the caller's thread while a step is computing (every
    KEEPALIVE_POLL_S) and once after it: a streaming answer's keep-alive comments.
    """

    def __init__(self, executor: "ModelThread", iterator: Iterator, on_wait: Optional[Callable[[], None]] = None):
        self.executor, self.iterator, self.on_wait = executor, iterator, on_wait

    def __iter__(self) -> "OnOneThread":
        return self

    def __next__(self):
        future = self.executor.submit(next, self.iterator)
        if self.on_wait is None:
            return future.result()
        while True:
            try:
                value = future.result(timeout=KEEPALIVE_POLL_S)
            except FutureTimeout:
                self.on_wait()
                continue
            self.on_wait()
            return value

    def close(self) -> None:
        self.executor.submit(self.iterator.close).result()


class StopStrings:
    """Cuts streamed text at the first stop string, holding back what may start one."""

    def __init__(self, stops: List[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""
        self.matched: Optional[str] = None  # the stop string reached

    def feed(self, text: str) -> Tuple[str, bool]:
        """(text safe to emit, whether a stop string was reached)."""
        self.pending += text
        hits = [(i, s) for s, i in ((s, self.pending.find(s)) for s in self.stops) if i >= 0]
        if hits:
            cut, self.matched = min(hits)
            out, self.pending = self.pending[:cut], ""
            return out, True
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.pending)), hold, -1):
                if self.pending.endswith(s[:k]):
                    hold = k
                    break
        cut = len(self.pending) - hold
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


# ---- request validation ------------------------------------------------------------


def _json_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise RequestError(f"A number in the request is out of range: {text[:24]}...")
    return int(text)


def _json_float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise RequestError(f"A number in the request is out of range: {text[:24]}")
    return value


def _json_constant(name: str):
    raise RequestError(f"The request body is not valid JSON: {name} is not a JSON number")


def parse_json(raw: bytes) -> Dict[str, Any]:
    """The request body as a JSON object whose numbers are finite and whose strings are
    valid Unicode (a lone surrogate cannot be tokenized), or RequestError."""
    try:
        body = json.loads(
            raw, parse_int=_json_int, parse_float=_json_float, parse_constant=_json_constant
        )
        json.dumps(body, ensure_ascii=False).encode("utf-8")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RequestError(f"The request body is not valid JSON: {e}")
    except UnicodeEncodeError:
        raise RequestError("The request body has a string with a lone surrogate (\\ud800-\\udfff)")
    except RecursionError:
        raise RequestError("The request body is nested too deeply")
    if not isinstance(body, dict):
        raise RequestError("The request body must be a JSON object")
    return body


def _field(body: Dict[str, Any], name: str, types, default=None, check=None, what: str = ""):
    value = body.get(name, default)
    if value is None:
        return default
    # JSON true/false are Python ints: never accept them as numbers.
    if isinstance(value, bool) and bool not in types or not isinstance(value, types):
        names = " or ".join(t.__name__ for t in types)
        raise RequestError(f"'{name}' must be of type {names}", param=name)
    if check is not None and not check(value):
        raise RequestError(f"'{name}' must be {what}, got {value!r}", param=name)
    return value


@dataclass
class Request:
    """The fields of a completion request this server honours, checked."""

    prompt: List[int]
    max_tokens: int
    sampling: SamplingParams
    stream: bool = False
    include_usage: bool = False
    stop: List[str] = field(default_factory=list)
    logprobs: bool = False
    top_logprobs: int = 0
    tools: Optional[List[Dict[str, Any]]] = None


def request_bytes(req: Optional[Request]) -> Optional[bytes]:
    """What another rank needs to decode `req` exactly as rank 0 does (prompt ids, sampling,
    length, stop strings, logprobs), not how the answer is shaped; None stays None."""
    if req is None:
        return None
    fields = dict(prompt=req.prompt, max_tokens=req.max_tokens, sampling=asdict(req.sampling), stop=req.stop,
                  logprobs=req.logprobs, top_logprobs=req.top_logprobs)
    return json.dumps(fields).encode()


def request_from_bytes(data: Optional[bytes]) -> Optional[Request]:
    if data is None:
        return None
    fields = json.loads(data)
    return Request(sampling=SamplingParams(**fields.pop("sampling")), **fields)


def share_request(req: Optional[Request], group) -> Optional[Request]:
    """Rank 0's next generation on every rank (None: the server stops); the others pass None.
    Called on rank 0's model thread, so that it reaches the followers in the order the model
    thread runs its passes."""
    return request_from_bytes(broadcast_bytes(request_bytes(req), group))


def parse_options(body: Dict[str, Any], defaults: argparse.Namespace) -> Dict[str, Any]:
    num = (int, float)
    opts = dict(
        stream=_field(body, "stream", (bool,), False),
        temperature=_field(body, "temperature", num, defaults.temp, lambda v: v >= 0, ">= 0"),
        top_p=_field(body, "top_p", num, defaults.top_p, lambda v: 0 < v <= 1, "in (0, 1]"),
        top_k=_field(body, "top_k", (int,), defaults.top_k, lambda v: v >= 0, ">= 0"),
        seed=_field(body, "seed", (int,), defaults.seed, lambda v: 0 <= v < 2**64, "in [0, 2**64)"),
        n=_field(body, "n", (int,), 1, lambda v: v == 1, "1 (one choice per request)"),
        **parse_processing(body, processing_kwargs(defaults)),
        model=_field(body, "model", (str,), None),
    )
    max_tokens = _field(body, "max_completion_tokens", (int,), None, lambda v: v >= 1, ">= 1")
    if max_tokens is None:
        max_tokens = _field(body, "max_tokens", (int,), None, lambda v: v >= 1, ">= 1")
    opts["max_tokens"] = max_tokens
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and not (
        isinstance(stop, list) and all(isinstance(s, str) for s in stop)
    ):
        raise RequestError("'stop' must be a string or a list of strings", param="stop")
    opts["stop"] = stop or []
    stream_options = _field(body, "stream_options", (dict,), {})
    opts["include_usage"] = bool(stream_options.get("include_usage", False))
    return opts


def parse_processing(body: Dict[str, Any], defaults: Dict[str, Any]) -> Dict[str, Any]:
    """min_p and mlx_lm.server's logits-processor fields; the flags' values where absent."""
    num = (int, float)
    opts = dict(
        min_p=_field(body, "min_p", num, defaults["min_p"], lambda v: 0 <= v <= 1, "in [0, 1]"),
        repetition_penalty=_field(
            body, "repetition_penalty", num, defaults["repetition_penalty"], lambda v: v >= 0, ">= 0"
        ),
        presence_penalty=_field(body, "presence_penalty", num, defaults["presence_penalty"]),
        frequency_penalty=_field(body, "frequency_penalty", num, defaults["frequency_penalty"]),
        logit_bias=_field(body, "logit_bias", (dict,), defaults["logit_bias"]),
    )
    for name in ("repetition_context_size", "presence_context_size", "frequency_context_size"):
        opts[name] = _field(body, name, (int,), defaults[name], lambda v: v >= 1, ">= 1")
    try:
        SamplingParams(logit_bias=opts["logit_bias"])
    except ValueError as e:
        raise RequestError(str(e), param="logit_bias")
    return opts


def message_text(content: Any, index: int) -> str:
    """A message's content: a string, or OpenAI's list of text parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(
        isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
        for p in content
    ):
        return "".join(p["text"] for p in content)
    raise RequestError(
        f"messages[{index}].content must be a string or a list of text parts", param="messages"
    )


def parse_messages(body: Dict[str, Any]) -> List[Dict[str, Any]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty list", param="messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise RequestError(f"messages[{i}] must be an object with a string 'role'", param="messages")
        message = {"role": m["role"], "content": message_text(m.get("content"), i)}
        for name in ("tool_call_id", "name"):  # a tool's answer names its call
            if m.get(name) is not None:
                if not isinstance(m[name], str):
                    raise RequestError(f"messages[{i}].{name} must be a string", param="messages")
                message[name] = m[name]
        if m.get("tool_calls") is not None:
            message["tool_calls"] = message_tool_calls(m["tool_calls"], i)
        out.append(message)
    return out


def message_tool_calls(calls: Any, index: int) -> List[Dict[str, Any]]:
    """An assistant message's earlier calls, their JSON `arguments` strings decoded into
    objects, as chat templates (and mlx_lm.server) expect them."""
    where = f"messages[{index}].tool_calls"
    if not isinstance(calls, list):
        raise RequestError(f"{where} must be a list", param="messages")
    out = []
    for call in calls:
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise RequestError(f"{where} entries must be objects with a 'function' naming a 'name'", param="messages")
        arguments = function.get("arguments", {})
        if isinstance(arguments, str):
            try:
                arguments = parse_json(arguments.encode("utf-8") or b"{}")
            except (RequestError, UnicodeEncodeError):
                raise RequestError(f"{where}: 'arguments' must be a JSON object", param="messages")
        if not isinstance(arguments, dict):
            raise RequestError(f"{where}: 'arguments' must be a JSON object", param="messages")
        out.append(dict(call, function=dict(function, arguments=arguments)))
    return out


TOOL_CHOICES = ("none", "auto", "required")


def parse_tools(body: Dict[str, Any]) -> Tuple[Optional[List[Dict[str, Any]]], Any]:
    """`tools` (OpenAI function tools) and `tool_choice`, checked, for the chat template."""
    tools = body.get("tools")
    if tools is not None:
        if not isinstance(tools, list) or not all(
            isinstance(t, dict) and t.get("type", "function") == "function"
            and isinstance(t.get("function"), dict) and isinstance(t["function"].get("name"), str)
            and isinstance(t["function"].get("parameters", {}), dict)
            for t in tools
        ):
            raise RequestError(
                "'tools' must be a list of {\"type\": \"function\", \"function\": {\"name\": ..., "
                "\"parameters\": {...}}} objects",
                param="tools",
            )
    choice = body.get("tool_choice")
    named = (
        isinstance(choice, dict) and choice.get("type", "function") == "function"
        and isinstance(choice.get("function"), dict) and isinstance(choice["function"].get("name"), str)
    )
    if choice is not None and choice not in TOOL_CHOICES and not named:
        raise RequestError(
            "'tool_choice' must be \"none\", \"auto\", \"required\" or "
            "{\"type\": \"function\", \"function\": {\"name\": ...}}",
            param="tool_choice",
        )
    return tools or None, choice


def parse_logprobs(body: Dict[str, Any], chat: bool) -> Tuple[bool, int]:
    """(whether to return log-probabilities, how many top alternatives per token).

    Chat takes `logprobs` true/false and `top_logprobs`; /v1/completions also takes
    OpenAI's older integer `logprobs` (that many alternatives). -1 means none, as in mlx-lm.
    """
    top = _field(body, "top_logprobs", (int,), 0, lambda v: -1 <= v <= MAX_TOP_LOGPROBS,
                 f"in [0, {MAX_TOP_LOGPROBS}]")
    wanted = body.get("logprobs")
    if not chat and isinstance(wanted, int) and not isinstance(wanted, bool):
        wanted = _field(body, "logprobs", (int,), 0, lambda v: 0 <= v <= MAX_TOP_LOGPROBS,
                        f"true, false or in [0, {MAX_TOP_LOGPROBS}]")
        return True, max(top, wanted)
    wanted = _field(body, "logprobs", (bool,), False)
    top = max(top, 0)
    return wanted or top > 0, top


# ---- the model side ---------------------------------------------------------------


class Piece(NamedTuple):
    """A stretch of the answer: its text, the finish reason on the last one, and the
    log-probability entries of the tokens generated since the previous piece."""

    text: str
    finish: Optional[str] = None
    logprobs: List[Dict[str, Any]] = []
    stop: Optional[str] = None  # the stop string that ended the answer


def finite(value: float) -> float:
    return value if math.isfinite(value) else -9999.0  # OpenAI's floor; JSON has no -inf


def logprob_entry(tokenizer, token: int, row: mx.array, top: int) -> Dict[str, Any]:
    """One token's entry in mlx_lm.server's shape (id, token, logprob), with its `top`
    alternatives, most likely first. Reads `row` (the base model's log-softmax)."""
    entry = {"id": token, "token": tokenizer.convert_ids_to_tokens(token), "logprob": finite(row[token].item())}
    top = min(top, row.size)
    entry["top_logprobs"] = []  # always there, as OpenAI's clients expect
    if top > 0:
        ids = mx.argpartition(-row, kth=top - 1)[:top]
        values = row[ids]
        order = mx.argsort(-values)
        ids, values = ids[order].tolist(), values[order].tolist()
        names = tokenizer.convert_ids_to_tokens(ids)
        entry["top_logprobs"] = [
            {"id": i, "token": n, "logprob": finite(v)} for i, n, v in zip(ids, names, values)
        ]
    return entry


class App:
    """The model, its prompt caches, and the lock that serialises generation."""

    def __init__(self, model, tokenizer, model_id: str, defaults: argparse.Namespace, template=None, auto="auto"):
        self.model, self.tokenizer = model, tokenizer
        self.auto = auto  # the block policy of requests that decode with "auto", shared by all
        self.model_id = model_id
        self.defaults = defaults
        self.template = template or {}
        self.context = model.args.max_position_embeddings
        disk_folder = getattr(defaults, "prompt_cache_dir", None)
        disk = None
        if disk_folder is not None:
            disk = DiskTier(disk_folder, model, getattr(defaults, "prompt_cache_disk_bytes", DISK_BYTES))
        self.caches = PromptCachePool(
            model, getattr(defaults, "prompt_cache_size", 4), getattr(defaults, "prompt_cache_bytes", None), disk,
            getattr(defaults, "max_kv_size", None),
        )
        self.lock = FifoLock()
        self.model_thread = ModelThread()
        self.group = model_group(model)  # under mlx.launch: the ranks that must decode every request
        self.batch = None
        concurrency = getattr(defaults, "decode_concurrency", 1)
        if concurrency > 1 and self.group is None:
            from .server_batch import BatchWorker

            self.batch = BatchWorker(self, concurrency, getattr(defaults, "prompt_concurrency", 1))
        self.created = int(time.time())

    def close(self) -> None:
        """Wait until none of this app's MLX work is left: the batch's requests ended and the
        model thread idle. Call it once no handler can start another request (`Server.stop`):
        MLX must not run on this app's thread while the caller's thread runs it too."""
        if self.batch is not None:
            self.batch.wait_idle()
        self.model_thread.drain()

    def encode(self, text: str, add_special_tokens: bool) -> List[int]:
        if len(text) > MAX_PROMPT_CHARS:
            raise RequestError(
                f"The prompt ({len(text)} characters) is over the limit of {MAX_PROMPT_CHARS} characters",
                param="prompt",
            )
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def encode_text(self, prompt: Any) -> List[int]:
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if isinstance(prompt, str):
            return self.encode(prompt, add_special_tokens(self.tokenizer, prompt))
        if isinstance(prompt, list) and prompt and all(
            isinstance(t, int) and not isinstance(t, bool) for t in prompt
        ):
            vocab = self.model.args.vocab_size
            if not all(0 <= t < vocab for t in prompt):
                raise RequestError(f"'prompt' token ids must be in [0, {vocab})", param="prompt")
            return prompt
        raise RequestError(
            "'prompt' must be a string or a list of token ids", param="prompt"
        )

    def request(self, path: str, body: Dict[str, Any]) -> Request:
        opts = parse_options(body, self.defaults)
        chat = path.endswith("chat/completions")
        logprobs, top_logprobs = parse_logprobs(body, chat)
        tools = None
        if chat:
            variables = _field(body, "chat_template_kwargs", (dict,), {})
            try:
                template = dict(self.template, **check_template_args(variables))
            except ValueError as e:
                raise RequestError(str(e), param="chat_template_kwargs")
            messages = parse_messages(body)
            tools, tool_choice = parse_tools(body)
            if self.defaults.system_prompt is not None and messages[0]["role"] != "system":
                messages = with_system(self.defaults.system_prompt, messages)
            prompt = self.encode(self.render(messages, template, tools, tool_choice), add_special_tokens=False)
        else:
            if "prompt" not in body:
                raise RequestError("'prompt' is required", param="prompt")
            prompt = self.encode_text(body["prompt"])
        if not prompt:
            raise RequestError("The prompt is empty", param="prompt")
        room = self.context - len(prompt)
        max_tokens = opts["max_tokens"]
        if max_tokens is None:
            max_tokens = min(self.defaults.max_tokens, room)
        try:
            check_context(len(prompt), max(max_tokens, 1), self.context)  # room for one token at least
        except ValueError as e:
            raise RequestError(str(e), param="max_tokens")
        try:
            sampling = SamplingParams(
                opts["temperature"], opts["top_p"], opts["top_k"], opts["seed"],
                **{name: opts[name] for name in PROCESSING if name in opts},
                min_tokens_to_keep=processing_kwargs(self.defaults)["min_tokens_to_keep"],
            )
        except ValueError as e:
            raise RequestError(str(e))
        vocab = self.model.args.vocab_size
        if any(t >= vocab for t in sampling.logit_bias or ()):
            raise RequestError(f"'logit_bias' token ids must be in [0, {vocab})", param="logit_bias")
        return Request(
            prompt, max_tokens, sampling, opts["stream"], opts["include_usage"], opts["stop"],
            logprobs, top_logprobs, tools,
        )

    def render(self, messages: List[Dict[str, Any]], template: Dict[str, Any], tools=None, tool_choice=None) -> str:
        """The chat template's text for `messages`; `tools` and `tool_choice` reach it as
        template variables (as in mlx_lm.server), only when the request has them."""
        extra = {k: v for k, v in (("tools", tools), ("tool_choice", tool_choice)) if v is not None}
        try:
            return chat_text(self.tokenizer, messages, template, **extra)
        except Exception as e:  # the template's own complaint (unknown role, ...)
            raise RequestError(f"The chat template failed: {e}", param="messages")

    def batches(self, req: Request) -> bool:
        """Whether `req` decodes in the batch: any request, greedy or sampled, with logprobs
        or logits processors, each row drawing what it draws alone (docs/DESIGN.md), both paths
        reusing the same prompt cache pool. The batch's cache has none of the KV cache flags
        (--kv-bits, --max-kv-size): with them, every request takes the one-at-a-time path
        rather than have its flags ignored."""
        flags = self.defaults
        plain_cache = getattr(flags, "kv_bits", None) is None and getattr(flags, "max_kv_size", None) is None
        return self.batch is not None and plain_cache

    def block_size(self, req: Request) -> Any:
        """The request's block length or policy, on either path (a seeded sample keeps a fixed one)."""
        return command_block_size(self.defaults.block_size, req.sampling.temperature, req.sampling.seed, self.auto)

    def generate(
        self,
        req: Request,
        usage: Dict[str, Any],
        progress: Optional[Callable[[int, int], None]] = None,
        on_wait: Optional[Callable[[], None]] = None,
    ) -> OnOneThread:
        """`Piece`s, computed on the model's thread; call under `self.lock` and close when
        done. Fills `usage` as it goes. `progress(done, total)` is called, on the model's
        thread, as the prompt prefills; `on_wait` on the caller's while it waits."""
        if self.batches(req):
            return self.batch.pieces(req, usage, self.block_size(req), not self.defaults.no_diffusion)
        if self.group is not None:
            return OnOneThread(self.model_thread, self._generate_everywhere(req, usage, progress), on_wait)
        return OnOneThread(self.model_thread, self._generate(req, usage, progress), on_wait)

    def _generate_everywhere(self, req: Request, usage: Dict[str, Any], progress=None) -> Iterator[Piece]:
        """`_generate` on rank 0 of a sharded model, the other ranks following (`follow`).

        Every pass is an all-sum over the ranks, so all must run the same passes: they get the
        request first, and stop where rank 0 stops (the end, or a stop string: each rank
        detokenizes alike). The one stop they cannot see is a client leaving, so then rank 0
        decodes on to the end too, and every rank's prompt caches keep the same tokens."""
        share_request(req, self.group)
        pieces = self._generate(req, usage, progress)
        try:
            for piece in pieces:
                yield piece
        except GeneratorExit:
            for _ in pieces:
                pass
            raise

    def follow(self) -> None:
        """A rank other than 0 under `mlx.launch`: decode each request rank 0's server decodes,
        in step with it, the answers dropped, until rank 0 says stop."""
        while (req := share_request(None, self.group)) is not None:
            try:
                for _ in self._generate(req, {}):
                    pass
            except Exception as e:  # rank 0 met it too, and answered the client with a 500
                log.error("generation failed on this rank: %s", printable(f"{type(e).__name__}: {e}"))

    def _generate(self, req: Request, usage: Dict[str, Any], progress=None) -> Iterator[Piece]:
        """A generation that ends, or stops because the caller closed this iterator, records
        what its prompt cache holds; one that raises drops the cache, which may hold a
        half-built graph or a torn write, and no later request can use it."""
        cache = self.caches.take(req.prompt)
        emitted: List[int] = []
        try:
            yield from self._pieces(req, usage, cache, emitted, progress)
        except GeneratorExit:  # the caller stopped reading (a disconnect): keep what was made
            self.caches.commit(cache, req.prompt, emitted)
            raise
        except BaseException:
            self.caches.discard(cache)
            raise
        self.caches.commit(cache, req.prompt, emitted)

    def _pieces(
        self, req: Request, usage: Dict[str, Any], cache, emitted: List[int], progress=None
    ) -> Iterator[Piece]:
        new = cache.prepare(req.prompt)
        usage.update(
            prompt_tokens=len(req.prompt),
            completion_tokens=0,
            prompt_tokens_details={"cached_tokens": len(req.prompt) - len(new)},
        )
        stops = StopStrings(req.stop)
        stats = DecodeStats()
        options = generation_kwargs(self.defaults)
        options.update(
            temperature=req.sampling.temperature,
            top_p=req.sampling.top_p,
            top_k=req.sampling.top_k,
            seed=req.sampling.seed,
            **{name: getattr(req.sampling, name) for name in PROCESSING},
            block_size=self.block_size(req),
        )
        responses = stream_generate(
            self.model,
            self.tokenizer,
            new,
            max_tokens=req.max_tokens,
            prompt_cache=cache.cache,
            stats=stats,
            logprobs=req.logprobs,
            prompt_progress_callback=progress,
            history=req.prompt[: len(req.prompt) - len(new)],  # processors see the whole prompt, cached or not
            **options,
        )
        logprobs: List[Dict[str, Any]] = []  # entries of tokens whose text has not gone out yet
        try:
            for r in responses:
                emitted.append(r.token)
                usage["completion_tokens"] = len(emitted)
                if req.logprobs:
                    logprobs.append(logprob_entry(self.tokenizer, r.token, r.logprobs, req.top_logprobs))
                text, stopped = stops.feed(r.text)
                if stopped:
                    yield Piece(text, "stop", logprobs, stops.matched)
                    return
                if r.finish_reason is not None:
                    yield Piece(text + stops.flush(), r.finish_reason, logprobs)
                    return
                if text:
                    yield Piece(text, None, logprobs)
                    logprobs = []
        finally:
            responses.close()
            usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
            usage["orthrus"] = {
                "steps": stats.steps,
                "mean_tokens_per_step": round(stats.mean_tokens_per_step, 3),
            }


# ---- HTTP -------------------------------------------------------------------------


def message_fields(delta, whole: bool = False) -> Dict[str, Any]:
    """A chat Delta as an OpenAI message (`whole`) or streamed delta, mlx_lm.server's field names."""
    out: Dict[str, Any] = {"role": "assistant"} if whole else {}
    if whole:
        out["content"] = None if delta.tool_calls and not delta.content else delta.content
    elif delta.content:
        out["content"] = delta.content
    if delta.reasoning:
        out["reasoning"] = delta.reasoning
    if delta.tool_calls:
        out["tool_calls"] = delta.tool_calls
    return out


def printable(text: str) -> str:
    """`text` with control, format and separator characters (CR, LF, ESC, C1, U+2028, bidi
    overrides...) and backslashes escaped, so that a client cannot forge or recolour log lines."""
    return "".join(
        c if c.isprintable() and c != "\\" else c.encode("unicode_escape").decode("ascii")
        for c in text
    )


class Handler(BaseHTTPRequestHandler):
    server_version = "orthrus-mlx"
    timeout = 60  # seconds a client may take to send its request

    @property
    def app(self) -> App:
        return self.server.app

    def log_message(self, format: str, *args) -> None:
        # The request line and the errors about it hold whatever bytes the client sent.
        log.info("%s %s", self.address_string(), printable(format % args))

    def send_error(self, code: int, message: Optional[str] = None, explain: Optional[str] = None) -> None:
        """http.server's own refusals (a bad request line, headers, method) in our JSON shape."""
        message = message or self.responses.get(code, ("Error",))[0]
        self.log_error("code %d, message %s", code, message)
        self.close_connection = True
        self.request_version = "HTTP/1.0"  # a line that failed to parse says 0.9: no status line
        self.send_error_json(code, message)

    headers_sent = False

    def send_response(self, code: int, message: Optional[str] = None) -> None:
        self.headers_sent = True
        super().send_response(code, message)

    def end_headers(self) -> None:
        """Every answer carries CORS headers, as mlx_lm.server's do: a browser page from an
        allowed origin (`--allowed-origins`, default any) may read it."""
        allowed = getattr(self.app.defaults, "allowed_origins", None) or ["*"]
        headers = getattr(self, "headers", None)  # none when the request line did not parse
        origin = headers.get("Origin") if headers is not None else None
        if "*" in allowed:
            self.send_header("Access-Control-Allow-Origin", "*")
        elif origin is not None and origin in allowed:
            self.send_header("Access-Control-Allow-Origin", origin)
            self.send_header("Vary", "Origin")
        self.send_header("Access-Control-Allow-Methods", "*")
        self.send_header("Access-Control-Allow-Headers", "*")
        super().end_headers()

    def do_OPTIONS(self) -> None:
        """A browser's CORS preflight: no body, the CORS headers."""
        self.send_response(204)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def send_json(self, status: int, payload: Dict[str, Any]) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    anthropic = False  # whether this request came to the Anthropic endpoint: errors in its shape

    def parse_request(self) -> bool:
        self.anthropic = False  # a kept-alive connection's next request starts afresh
        return super().parse_request()

    def send_error_json(self, status: int, message: str, param: Optional[str] = None) -> None:
        if self.anthropic:
            self.send_json(status, anthropic.error_body(status, message))
            return
        kind = "invalid_request_error" if status < 500 else "server_error"
        self.send_json(
            status, {"error": {"message": message, "type": kind, "param": param, "code": None}}
        )

    def do_GET(self) -> None:
        path = self.path.split("?")[0].rstrip("/")
        if path == "/health":
            caches = self.app.caches.caches
            self.send_json(200, {"status": "ok", "prompt_caches": [len(c) for c in caches],
                                 "prompt_cache_bytes": self.app.caches.nbytes})
        elif path == "/v1/models":
            model = {"id": self.app.model_id, "object": "model", "created": self.app.created,
                     "owned_by": "orthrus-mlx"}
            self.send_json(200, {"object": "list", "data": [model]})
        else:
            self.send_error_json(404, f"No route for GET {self.path}")

    def do_POST(self) -> None:
        path = self.path.split("?")[0].rstrip("/")
        self.anthropic = path in MESSAGES_PATHS
        if path not in ("/v1/chat/completions", "/v1/completions", "/chat/completions") + MESSAGES_PATHS:
            self.send_error_json(404, f"No route for POST {self.path}")
            return
        try:
            body = self.read_body()
            if self.anthropic:
                body = anthropic.chat_body(dict(body, max_tokens=1) if path.endswith("count_tokens") else body)
            req = self.app.request("/v1/chat/completions" if self.anthropic else path, body)
            if path.endswith("count_tokens"):
                self.send_json(200, {"input_tokens": len(req.prompt)})
                return
        except RequestError as e:
            self.send_error_json(e.status, str(e), e.param)
            return
        except DISCONNECTS:
            self.close_connection = True
            log.info("client disconnected before its request was read")
            return
        except Exception as e:  # a check we lack: still one JSON answer, and a log line
            self.log_failure("reading the request failed", e)
            self.send_error_json(500, f"Reading the request failed: {e}")
            return
        chat = path.endswith("chat/completions")
        with contextlib.nullcontext() if self.app.batches(req) else self.app.lock:
            try:
                if self.anthropic:
                    (self.stream_message if req.stream else self.whole_message)(req)
                elif req.stream:
                    self.stream_response(req, chat)
                else:
                    self.whole_response(req, chat)
            except Exception as e:  # a bug, not the client's fault: say so, keep serving
                self.log_failure("generation failed", e)
                self.close_connection = True
                if not self.headers_sent:
                    self.send_error_json(500, f"Generation failed: {e}")

    def read_body(self) -> Dict[str, Any]:
        length = self.headers.get("Content-Length")
        if length is None:
            raise RequestError("A Content-Length header is required", status=411)
        if not (length.isascii() and length.isdigit() and len(length) <= MAX_INT_DIGITS):
            raise RequestError(f"Bad Content-Length header: {length!r}")
        length = int(length)
        if length > MAX_BODY_BYTES:
            self.close_connection = True
            self.drain(length)
            raise RequestError(
                f"The request body ({length} bytes) is over the limit of {MAX_BODY_BYTES} bytes",
                status=413,
            )
        try:
            raw = self.rfile.read(length)
        except socket.timeout:
            self.close_connection = True
            raise RequestError("Timed out reading the request body", status=408)
        if len(raw) < length:
            self.close_connection = True
            raise RequestError("The request body is shorter than its Content-Length")
        return parse_json(raw)

    def drain(self, length: int) -> None:
        """Read and drop an oversized body (bounded) so the client gets to read our 413."""
        self.connection.settimeout(2)
        left = min(length, 64 * MAX_BODY_BYTES)
        try:
            while left > 0:
                chunk = self.rfile.read(min(left, 1 << 16))
                if not chunk:
                    break
                left -= len(chunk)
        except (socket.timeout, OSError):
            pass

    def envelope(self, rid: str, chat: bool, stream: bool) -> Dict[str, Any]:
        kind = ("chat.completion.chunk" if stream else "chat.completion") if chat else "text_completion"
        return {"id": rid, "object": kind, "created": int(time.time()), "model": self.app.model_id}

    def whole_response(self, req: Request, chat: bool) -> None:
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        usage: Dict[str, Any] = {}
        text, finish, logprobs = "", None, []
        pieces = self.app.generate(req, usage)
        try:
            for piece in pieces:
                text += piece.text
                finish = piece.finish
                logprobs += piece.logprobs
        finally:
            pieces.close()
        choice: Dict[str, Any] = {
            "index": 0, "finish_reason": finish, "logprobs": {"content": logprobs} if req.logprobs else None,
        }
        if chat:
            output = ChatOutput(self.app.tokenizer, req.prompt, req.tools)
            choice["message"] = message_fields(output.feed(text, final=True), whole=True)
            choice["finish_reason"] = output.finish_reason(finish)
        else:
            choice["text"] = text
        self.log_generation(usage, finish)
        try:
            self.send_json(200, dict(self.envelope(rid, chat, False), choices=[choice], usage=usage))
        except DISCONNECTS:
            log.info("client disconnected before the answer was sent")

    def stream_response(self, req: Request, chat: bool) -> None:
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        head = self.envelope(rid, chat, True)
        pending: List[Dict[str, Any]] = []  # logprob entries not sent yet

        def chunk(part: Any, finish: Optional[str], first: bool = False) -> Dict[str, Any]:
            """`part`: a chat Delta (or None), or completion text."""
            logprobs = {"content": pending[:]} if req.logprobs else None
            pending.clear()
            if chat:
                delta = message_fields(part) if part is not None else {}
                if first:
                    delta.update(role="assistant", content="")
                choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": logprobs}
            else:
                choice = {"index": 0, "text": part or "", "finish_reason": finish, "logprobs": logprobs}
            return dict(head, choices=[choice])

        usage: Dict[str, Any] = {}
        finish = None
        output = ChatOutput(self.app.tokenizer, req.prompt, req.tools, streaming=True) if chat else None
        pieces = self.streamed_pieces(req, usage)
        try:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.end_headers()
            if chat:
                self.send_event(chunk(None, None, first=True))
            for piece in pieces:
                finish = piece.finish
                pending += piece.logprobs
                part = output.feed(piece.text) if chat else piece.text
                if part:
                    self.send_event(chunk(part, None))
            if chat:
                part = output.feed("", final=True)
                if part:
                    self.send_event(chunk(part, None))
                finish = output.finish_reason(finish)
            self.send_event(chunk(None, finish))
            if req.include_usage:
                self.send_event(dict(head, choices=[], usage=usage))
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
        except DISCONNECTS:
            self.close_connection = True
            log.info("client disconnected mid-stream after %d tokens; generation stopped",
                     usage.get("completion_tokens", 0))
        finally:
            pieces.close()  # stops generation and records the cache
        self.log_generation(usage, finish)

    def streamed_pieces(self, req: Request, usage: Dict[str, Any]) -> OnOneThread:
        """`App.generate` for a streamed answer: mlx_lm.server's habit of an SSE comment per
        prefill chunk, so that proxies and clients waiting through a long prompt see it live."""
        progress: "queue.SimpleQueue[Tuple[int, int]]" = queue.SimpleQueue()

        def keepalive() -> None:
            while not progress.empty():
                done, total = progress.get()
                self.wfile.write(f": keepalive {done}/{total}\n\n".encode())
                self.wfile.flush()

        return self.app.generate(req, usage, lambda done, total: progress.put((done, total)), keepalive)

    def whole_message(self, req: Request) -> None:
        """An Anthropic message: the answer's parts as content blocks."""
        usage: Dict[str, Any] = {}
        text, finish, stop = "", None, None
        pieces = self.app.generate(req, usage)
        try:
            for piece in pieces:
                text += piece.text
                finish, stop = piece.finish, piece.stop
        finally:
            pieces.close()
        output = ChatOutput(self.app.tokenizer, req.prompt, req.tools)
        blocks = anthropic.content_blocks(output.feed(text, final=True).parts)
        reason = anthropic.stop_reason(finish, stop, output.made_tool_call)
        self.log_generation(usage, finish)
        rid = f"msg_{uuid.uuid4().hex}"
        try:
            self.send_json(200, anthropic.message(rid, self.app.model_id, blocks, reason, stop, usage))
        except DISCONNECTS:
            log.info("client disconnected before the answer was sent")

    def stream_message(self, req: Request) -> None:
        """An Anthropic message as its stream of events (named SSE events, as Anthropic sends)."""

        def send(name: str, payload: Dict[str, Any]) -> None:
            self.wfile.write(f"event: {name}\ndata: {json.dumps(payload)}\n\n".encode())
            self.wfile.flush()

        usage: Dict[str, Any] = {"prompt_tokens": len(req.prompt)}
        finish, stop = None, None
        output = ChatOutput(self.app.tokenizer, req.prompt, req.tools, streaming=True)
        events = anthropic.Events(send)
        pieces = self.streamed_pieces(req, usage)
        try:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.end_headers()
            rid = f"msg_{uuid.uuid4().hex}"
            send("message_start", {"type": "message_start",
                                   "message": anthropic.message(rid, self.app.model_id, [], None, None, usage)})
            for piece in pieces:
                finish, stop = piece.finish, piece.stop
                events.feed(output.feed(piece.text).parts)
            events.feed(output.feed("", final=True).parts)
            events.close()
            reason = anthropic.stop_reason(finish, stop, output.made_tool_call)
            send("message_delta", {"type": "message_delta", "delta": {"stop_reason": reason, "stop_sequence": stop},
                                   "usage": anthropic.message_usage(usage)})
            send("message_stop", {"type": "message_stop"})
        except DISCONNECTS:
            self.close_connection = True
            log.info("client disconnected mid-stream after %d tokens; generation stopped",
                     usage.get("completion_tokens", 0))
        finally:
            pieces.close()
        self.log_generation(usage, finish)

    def send_event(self, payload: Dict[str, Any]) -> None:
        self.wfile.write(b"data: " + json.dumps(payload).encode() + b"\n\n")
        self.wfile.flush()

    def log_failure(self, what: str, e: Exception) -> None:
        """The traceback, with the message (which may quote the request) on one escaped line."""
        frames = "".join(traceback.format_tb(e.__traceback__))
        log.error("%s: %s\n%s", what, printable(f"{type(e).__name__}: {e}"), frames.rstrip())

    def log_generation(self, usage: Dict[str, Any], finish: Optional[str]) -> None:
        log.info(
            "prompt %d tokens (%d cached), %d generated, finish %s",
            usage.get("prompt_tokens", 0),
            usage.get("prompt_tokens_details", {}).get("cached_tokens", 0),
            usage.get("completion_tokens", 0),
            finish,
        )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1", help="Host to listen on (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8080, help="Port to listen on (default: 8080)")
    add_chat_template_arguments(parser)
    add_sampling_arguments(parser, max_tokens=512)
    add_cache_arguments(parser)
    parser.add_argument(
        "--prompt-cache-size",
        type=int,
        default=4,
        help="How many conversations' KV caches to keep at once (default: 4)",
    )
    parser.add_argument(
        "--prompt-cache-bytes",
        type=byte_size,
        default=None,
        help="Most bytes the kept KV caches may hold together, e.g. 8GB or 500M (default: no bound "
        "beyond --prompt-cache-size)",
    )
    parser.add_argument(
        "--prompt-cache-dir",
        default=None,
        help="Keep conversations' KV caches on disk in this folder too: one evicted from memory, or "
        "from before a restart, resumes without prefilling again (default: memory only)",
    )
    parser.add_argument(
        "--prompt-cache-disk-bytes",
        type=byte_size,
        default=DISK_BYTES,
        help=f"Most bytes --prompt-cache-dir may hold (default: {DISK_BYTES // 10**9}GB)",
    )
    parser.add_argument(
        "--decode-concurrency",
        type=int,
        default=1,
        help="Decode up to N concurrent requests together, in one batch, each exactly as alone "
        "(default: 1, one request at a time)",
    )
    parser.add_argument(
        "--prompt-concurrency",
        type=int,
        default=1,
        help="With --decode-concurrency: how many newcomers may be prefilling at once, one chunk each "
        "per batch step (default: 1)",
    )
    parser.add_argument(
        "--allowed-origins",
        type=lambda value: [o.strip() for o in value.split(",") if o.strip()],
        default=["*"],
        help="Comma-separated origins whose browser pages may read the answers (CORS), or * (default: *)",
    )
    parser.add_argument(
        "--chat-template",
        default=None,
        help="A chat template (Jinja) to use instead of the tokenizer's: the template itself, or a file "
        "holding it",
    )
    parser.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="Logging level (default: INFO)",
    )


SIZE_UNITS = {"": 1, "K": 10**3, "KB": 10**3, "M": 10**6, "MB": 10**6, "G": 10**9, "GB": 10**9, "T": 10**12,
              "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def byte_size(value: str) -> int:
    """A size such as 8GB, 500M, 1.5GiB or 1000000 (mlx-lm's units, plus binary ones)."""
    text = value.strip().upper()
    digits = len(text) - len(text.lstrip("0123456789."))
    number, unit = text[:digits], text[digits:].strip()
    try:
        size = int(float(number) * SIZE_UNITS[unit])
        if size < 1:
            raise ValueError
    except (ValueError, KeyError, OverflowError):
        raise argparse.ArgumentTypeError(f"expected a size such as 8GB, 500M or 1000000 bytes, got {value!r}")
    return size


def read_chat_template(value: Optional[str]) -> Optional[str]:
    """`--chat-template`: a file's text when `value` names a file, else `value` itself, which
    must then look like a template (a mistyped file name is an error, not a template)."""
    if value is None:
        return None
    path = Path(value).expanduser()
    try:
        is_file = path.is_file()
    except (OSError, ValueError):  # a template is no file name: too long, a NUL...
        is_file = False
    if is_file:
        try:
            return path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"--chat-template: cannot read {value}: {e}")
    if "{{" not in value and "{%" not in value:
        raise ValueError(f"--chat-template: {value!r} is neither a file nor a Jinja template")
    return value


def load_for_server(args: argparse.Namespace, chat_template: Optional[str]):
    """The model and tokenizer; a `chat_template` replaces the tokenizer's before mlx-lm picks
    the tool parser from it (as `mlx_lm.server --chat-template` does)."""
    if chat_template is None:
        return load_from_args(args)
    return load_from_args(args, tokenizer_config={"chat_template": chat_template})


def check_chat_template(tokenizer, template: Dict[str, Any]) -> None:
    """Render a one-message chat once at start, so that a broken template is one line now,
    not a 400 on every request."""
    try:
        chat_text(tokenizer, [{"role": "user", "content": "hi"}], template)
    except Exception as e:
        raise ValueError(f"The chat template failed on a one-message chat: {' '.join(str(e).split())}") from e


def make_server(app: App, host: str, port: int) -> ThreadingHTTPServer:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, _, _, _, address = infos[0]

    class Server(ThreadingHTTPServer):
        address_family = family
        daemon_threads = True  # a client that never finishes its request cannot hold the exit
        request_queue_size = LISTEN_BACKLOG
        handlers = 0  # handler threads running (daemon threads are not joined by server_close)
        handlers_changed = threading.Condition()

        def process_request(self, request, client_address) -> None:
            with self.handlers_changed:
                self.handlers += 1
            super().process_request(request, client_address)

        def process_request_thread(self, request, client_address) -> None:
            try:
                super().process_request_thread(request, client_address)
            finally:
                with self.handlers_changed:
                    self.handlers -= 1
                    self.handlers_changed.notify_all()

        def handle_error(self, request, client_address) -> None:
            # A client that left before its answer was written is no server error.
            if isinstance(sys.exc_info()[1], DISCONNECTS):
                log.info("%s left before its answer was written", client_address[0])
            else:
                super().handle_error(request, client_address)

        def stop(self, timeout: Optional[float] = None) -> bool:
            """Stop serving (from another thread than `serve_forever`'s) and wait until no work
            of this server is left: its handlers returned, the app's model thread idle. False
            if handlers were still running after `timeout` seconds (the app is left as it is)."""
            self.shutdown()
            self.server_close()
            with self.handlers_changed:
                if not self.handlers_changed.wait_for(lambda: self.handlers == 0, timeout):
                    return False
            self.app.close()
            return True

    httpd = Server(address, Handler)
    httpd.app = app
    return httpd


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(message)s")
    if world().size() > 1:
        check_distributed_flags(args)
    sampling_params(args)
    cache_kwargs(args)
    if args.prompt_cache_size < 1:
        raise ValueError(f"--prompt-cache-size must be >= 1, got {args.prompt_cache_size}")
    template = template_kwargs(args)
    chat_template = read_chat_template(args.chat_template)
    model, tokenizer = load_for_server(args, chat_template)
    check_cache_flags(model, args)
    if chat_template is not None:
        check_chat_template(tokenizer, template)
    model_id = args.model or DEFAULT_MODEL.name
    app = App(model, tokenizer, model_id, args, template, command_policy(model, args))
    if app.group is None:
        return serve(app, args)
    if app.group.rank() != 0:
        app.follow()
        return 0
    try:
        return serve(app, args)
    finally:  # the followers leave their loop
        app.model_thread.submit(share_request, None, app.group).result()


def check_distributed_flags(args: argparse.Namespace) -> None:
    """The flags a server under `mlx.launch` cannot honour yet, refused on every rank alike."""
    if args.decode_concurrency > 1:
        raise ValueError("--decode-concurrency does not run under mlx.launch: requests decode one at a time")
    if args.prompt_cache_dir is not None:
        raise ValueError("--prompt-cache-dir does not run under mlx.launch: each rank's caches hold its own heads")


def serve(app: App, args: argparse.Namespace) -> int:
    """Answer HTTP until Ctrl-C or SIGTERM (rank 0 only, under `mlx.launch`)."""
    httpd = make_server(app, args.host, args.port)
    host, port = httpd.server_address[:2]
    log.info("serving %s on http://%s:%d", app.model_id, host, port)
    # A service manager's stop (SIGTERM) ends like Ctrl-C: the prompt caches reach the disk tier.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        httpd.server_close()
        app.model_thread.submit(app.caches.flush).result()
    return 0
