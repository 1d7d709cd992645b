"""`orthrus-mlx server`: OpenAI-compatible HTTP over one model, one request at a time.

POST /v1/chat/completions and /v1/completions (SSE streaming or not), GET /v1/models
and /health. Requests generate one at a time in arrival order, all on one model thread
(see OnOneThread); a small pool of prompt caches keeps each conversation's prefix, so a
request prefills only what is new.

What a client sends is bounded before any work: a body of at most MAX_BODY_BYTES, finite
numbers, integers of at most 20 digits, only the chat template variables of
`flags.TEMPLATE_VARIABLES` (never a template of its own, so rendering the model's template
takes time linear in the body), a rendered prompt of at most MAX_PROMPT_CHARS characters
and a token count that fits the context. A generation that fails drops the prompt cache it
used, so no failure reaches a later request.
"""

import argparse
import json
import logging
import socket
import sys
import threading
import time
import traceback
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Dict, Iterator, List, Optional, Tuple

from ..core.sampling import SamplingParams
from ..core.step import DecodeStats, check_context
from ..generate import add_special_tokens, stream_generate
from ..loader import DEFAULT_MODEL
from ..prompt_cache import PromptCachePool
from .flags import (
    add_chat_template_arguments,
    add_model_arguments,
    add_sampling_arguments,
    chat_text,
    check_template_args,
    command_block_size,
    command_policy,
    generation_kwargs,
    load_from_args,
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
LISTEN_BACKLOG = 128  # connections the kernel holds while we accept; bursts of clients get no resets
DISCONNECTS = (BrokenPipeError, ConnectionResetError, ConnectionAbortedError, TimeoutError)
log = logging.getLogger("orthrus_mlx.server")


class RequestError(ValueError):
    """A request the server refuses, with its HTTP status and the offending field."""

    def __init__(self, message: str, status: int = 400, param: Optional[str] = None):
        super().__init__(message)
        self.status, self.param = status, param


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
    """

    def __init__(self, executor: ThreadPoolExecutor, iterator: Iterator):
        self.executor, self.iterator = executor, iterator

    def __iter__(self) -> "OnOneThread":
        return self

    def __next__(self):
        return self.executor.submit(next, self.iterator).result()

    def close(self) -> None:
        self.executor.submit(self.iterator.close).result()


class StopStrings:
    """Cuts streamed text at the first stop string, holding back what may start one."""

    def __init__(self, stops: List[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""

    def feed(self, text: str) -> Tuple[str, bool]:
        """(text safe to emit, whether a stop string was reached)."""
        self.pending += text
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending = self.pending[: min(hits)], ""
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


def parse_options(body: Dict[str, Any], defaults: argparse.Namespace) -> Dict[str, Any]:
    num = (int, float)
    opts = dict(
        stream=_field(body, "stream", (bool,), False),
        temperature=_field(body, "temperature", num, defaults.temp, lambda v: v >= 0, ">= 0"),
        top_p=_field(body, "top_p", num, defaults.top_p, lambda v: 0 < v <= 1, "in (0, 1]"),
        top_k=_field(body, "top_k", (int,), defaults.top_k, lambda v: v >= 0, ">= 0"),
        seed=_field(body, "seed", (int,), defaults.seed, lambda v: 0 <= v < 2**64, "in [0, 2**64)"),
        n=_field(body, "n", (int,), 1, lambda v: v == 1, "1 (one choice per request)"),
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


def parse_messages(body: Dict[str, Any]) -> List[Dict[str, str]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty list", param="messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise RequestError(f"messages[{i}] must be an object with a string 'role'", param="messages")
        out.append({"role": m["role"], "content": message_text(m.get("content"), i)})
    return out


# ---- the model side ---------------------------------------------------------------


class App:
    """The model, its prompt caches, and the lock that serialises generation."""

    def __init__(self, model, tokenizer, model_id: str, defaults: argparse.Namespace, template=None, auto="auto"):
        self.model, self.tokenizer = model, tokenizer
        self.auto = auto  # the block policy of requests that decode with "auto", shared by all
        self.model_id = model_id
        self.defaults = defaults
        self.template = template or {}
        self.context = model.args.max_position_embeddings
        self.caches = PromptCachePool(model, getattr(defaults, "prompt_cache_size", 4))
        self.lock = FifoLock()
        self.model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="orthrus-mlx")
        self.created = int(time.time())

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
        if path.endswith("chat/completions"):
            variables = _field(body, "chat_template_kwargs", (dict,), {})
            try:
                template = dict(self.template, **check_template_args(variables))
            except ValueError as e:
                raise RequestError(str(e), param="chat_template_kwargs")
            messages = parse_messages(body)
            if self.defaults.system_prompt is not None and messages[0]["role"] != "system":
                messages = with_system(self.defaults.system_prompt, messages)
            try:
                text = chat_text(self.tokenizer, messages, template)
            except Exception as e:  # the template's own complaint (unknown role, ...)
                raise RequestError(f"The chat template failed: {e}", param="messages")
            prompt = self.encode(text, add_special_tokens=False)
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
            sampling = SamplingParams(opts["temperature"], opts["top_p"], opts["top_k"], opts["seed"])
        except ValueError as e:
            raise RequestError(str(e))
        return Request(prompt, max_tokens, sampling, opts["stream"], opts["include_usage"], opts["stop"])

    def generate(self, req: Request, usage: Dict[str, Any]) -> OnOneThread:
        """(text, finish_reason) pieces, computed on the model's thread; call under `self.lock`
        and close when done. Fills `usage` as it goes."""
        return OnOneThread(self.model_thread, self._generate(req, usage))

    def _generate(self, req: Request, usage: Dict[str, Any]) -> Iterator[Tuple[str, Optional[str]]]:
        """A generation that ends, or stops because the caller closed this iterator, records
        what its prompt cache holds; one that raises drops the cache, which may hold a
        half-built graph or a torn write, and no later request can use it."""
        cache = self.caches.take(req.prompt)
        emitted: List[int] = []
        try:
            yield from self._pieces(req, usage, cache, emitted)
        except GeneratorExit:  # the caller stopped reading (a disconnect): keep what was made
            self.caches.commit(cache, req.prompt, emitted)
            raise
        except BaseException:
            self.caches.discard(cache)
            raise
        self.caches.commit(cache, req.prompt, emitted)

    def _pieces(
        self, req: Request, usage: Dict[str, Any], cache, emitted: List[int]
    ) -> Iterator[Tuple[str, Optional[str]]]:
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
            block_size=command_block_size(
                self.defaults.block_size, req.sampling.temperature, req.sampling.seed, self.auto
            ),
        )
        responses = stream_generate(
            self.model,
            self.tokenizer,
            new,
            max_tokens=req.max_tokens,
            prompt_cache=cache.cache,
            stats=stats,
            **options,
        )
        try:
            for r in responses:
                emitted.append(r.token)
                usage["completion_tokens"] = len(emitted)
                text, stopped = stops.feed(r.text)
                if stopped:
                    yield text, "stop"
                    return
                if r.finish_reason is not None:
                    yield text + stops.flush(), r.finish_reason
                    return
                if text:
                    yield text, None
        finally:
            responses.close()
            usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
            usage["orthrus"] = {
                "steps": stats.steps,
                "mean_tokens_per_step": round(stats.mean_tokens_per_step, 3),
            }


# ---- HTTP -------------------------------------------------------------------------


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

    def send_json(self, status: int, payload: Dict[str, Any]) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def send_error_json(self, status: int, message: str, param: Optional[str] = None) -> None:
        kind = "invalid_request_error" if status < 500 else "server_error"
        self.send_json(
            status, {"error": {"message": message, "type": kind, "param": param, "code": None}}
        )

    def do_GET(self) -> None:
        path = self.path.split("?")[0].rstrip("/")
        if path == "/health":
            caches = self.app.caches.caches
            self.send_json(200, {"status": "ok", "prompt_caches": [len(c) for c in caches]})
        elif path == "/v1/models":
            model = {"id": self.app.model_id, "object": "model", "created": self.app.created,
                     "owned_by": "orthrus-mlx"}
            self.send_json(200, {"object": "list", "data": [model]})
        else:
            self.send_error_json(404, f"No route for GET {self.path}")

    def do_POST(self) -> None:
        path = self.path.split("?")[0].rstrip("/")
        if path not in ("/v1/chat/completions", "/v1/completions", "/chat/completions"):
            self.send_error_json(404, f"No route for POST {self.path}")
            return
        try:
            body = self.read_body()
            req = self.app.request(path, body)
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
        with self.app.lock:
            try:
                if req.stream:
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
        text, finish = "", None
        pieces = self.app.generate(req, usage)
        try:
            for piece, finish in pieces:
                text += piece
        finally:
            pieces.close()
        choice: Dict[str, Any] = {"index": 0, "finish_reason": finish, "logprobs": None}
        if chat:
            choice["message"] = {"role": "assistant", "content": text}
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

        def chunk(text: Optional[str], finish: Optional[str], first: bool = False) -> Dict[str, Any]:
            if chat:
                delta = {} if text is None else {"content": text}
                if first:
                    delta["role"] = "assistant"
                choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
            else:
                choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
            return dict(head, choices=[choice])

        usage: Dict[str, Any] = {}
        finish = None
        pieces = self.app.generate(req, usage)
        try:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.end_headers()
            if chat:
                self.send_event(chunk("", None, first=True))
            for text, finish in pieces:
                if text:
                    self.send_event(chunk(text, None))
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
    parser.add_argument(
        "--prompt-cache-size",
        type=int,
        default=4,
        help="How many conversations' KV caches to keep at once (default: 4)",
    )
    parser.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="Logging level (default: INFO)",
    )


def make_server(app: App, host: str, port: int) -> ThreadingHTTPServer:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, _, _, _, address = infos[0]

    class Server(ThreadingHTTPServer):
        address_family = family
        daemon_threads = True
        request_queue_size = LISTEN_BACKLOG

        def handle_error(self, request, client_address) -> None:
            # A client that left before its answer was written is no server error.
            if isinstance(sys.exc_info()[1], DISCONNECTS):
                log.info("%s left before its answer was written", client_address[0])
            else:
                super().handle_error(request, client_address)

    httpd = Server(address, Handler)
    httpd.app = app
    return httpd


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(message)s")
    sampling_params(args)
    if args.prompt_cache_size < 1:
        raise ValueError(f"--prompt-cache-size must be >= 1, got {args.prompt_cache_size}")
    template = template_kwargs(args)
    model, tokenizer = load_from_args(args)
    model_id = args.model or DEFAULT_MODEL.name
    app = App(model, tokenizer, model_id, args, template, command_policy(model, args))
    httpd = make_server(app, args.host, args.port)
    host, port = httpd.server_address[:2]
    log.info("serving %s on http://%s:%d", model_id, host, port)
    try:
        httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        httpd.server_close()
    return 0
