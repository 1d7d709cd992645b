"""The server's batched path (--decode-concurrency): concurrent requests decoded together, each
with its own sampling, seed, logits processors and logprobs, as it decodes alone.

One coordinating thread owns a `BatchDecoder`; every decoder call runs on the model's thread (MLX
evaluates a graph only on the stream of the thread that built it). While the batch holds
requests it holds the server's generation lock, so a one-at-a-time request waits its turn.

Each request borrows its prompt's longest cached prefix from the server's prompt cache pool (as
the one-at-a-time path takes one) and prefills only the rest; its cache goes back to the pool
when it leaves the batch, so the conversation's next turn finds it.
"""

import copy
import logging
import queue
import threading
from typing import Any, Dict, List, Optional

from ..batch import BatchDecoder, Emitted
from ..generate import SAMPLING_FIELDS
from .server import Piece, StopStrings, logprob_entry

END = object()

log = logging.getLogger(__name__)


class BatchedPieces:
    """One request's `Piece`s, made by the batch thread and read on the connection's thread."""

    def __init__(self, request, usage: Dict[str, Any], tokenizer, eos: frozenset):
        self.request, self.usage, self.eos = request, usage, eos
        self.detokenizer = copy.copy(tokenizer.detokenizer)  # the wrapper's own is shared
        self.detokenizer.reset()
        self.stops = StopStrings(request.stop)
        self.out: "queue.SimpleQueue[Any]" = queue.SimpleQueue()
        self.closed = False
        self.pending: List[Dict[str, Any]] = []  # logprob entries of tokens whose text has not gone out
        self.emitted = 0
        self.steps: List[int] = []
        self.cache = None  # the PromptCache lent for this request, while it is in the batch
        self.generated: List[int] = []  # every token the decoder emitted, past a stop string too
        usage.update(prompt_tokens=len(request.prompt), completion_tokens=0, total_tokens=len(request.prompt),
                     prompt_tokens_details={"cached_tokens": 0})

    def __iter__(self) -> "BatchedPieces":
        return self

    def __next__(self) -> Piece:
        item = self.out.get()
        if item is END:
            self.out.put(END)
            raise StopIteration
        if isinstance(item, BaseException):
            self.out.put(END)
            raise item
        return item

    def close(self) -> None:
        self.closed = True  # the batch thread drops the row at its next step

    def feed(self, tokens: List[int], entries: Optional[List[Dict[str, Any]]] = None) -> Optional[Piece]:
        """Turn a step's tokens (and their logprob `entries`) into pieces; once the request is
        done (EOS, length, stop), its last piece, held back for `end`."""
        if tokens and self.emitted:
            self.steps.append(len(tokens))
        for i, token in enumerate(tokens):
            self.emitted += 1
            finish = "stop" if token in self.eos else "length" if self.emitted >= self.request.max_tokens else None
            if token not in self.eos:
                self.detokenizer.add_token(token)
            if finish:
                self.detokenizer.finalize()
            self.update_usage()
            if entries is not None:
                self.pending.append(entries[i])
            text, stopped = self.stops.feed(self.detokenizer.last_segment)
            if stopped:
                return Piece(text, "stop", self.pending, self.stops.matched)
            if finish:
                return Piece(text + self.stops.flush(), finish, self.pending)
            if text:
                self.out.put(Piece(text, None, self.pending))
                self.pending = []
        return None

    def update_usage(self) -> None:
        self.usage.update(completion_tokens=self.emitted, total_tokens=len(self.request.prompt) + self.emitted)
        steps = max(1, len(self.steps))
        self.usage["orthrus"] = {"steps": len(self.steps),
                                 "mean_tokens_per_step": round(sum(self.steps) / steps, 3)}

    def end(self, last: Optional[Piece] = None) -> None:
        if last is not None:
            self.out.put(last)
        self.out.put(END)

    def fail(self, error: BaseException) -> None:
        self.out.put(error)


class BatchWorker:
    """Admits up to `concurrency` requests into one batch (at most `prompt_concurrency` of them
    prefilling at once) and steps it until it is empty."""

    def __init__(self, app, concurrency: int, prompt_concurrency: int):
        self.app = app
        self.concurrency, self.prompt_concurrency = concurrency, prompt_concurrency
        self.incoming: "queue.SimpleQueue[Any]" = queue.SimpleQueue()
        self.eos = frozenset(app.tokenizer.eos_token_ids)
        self.decoder: Optional[BatchDecoder] = None
        self.requests = 0  # handed in and not ended yet
        self.requests_changed = threading.Condition()
        threading.Thread(target=self.run, name="orthrus-mlx-batch", daemon=True).start()

    def pieces(self, request, usage: Dict[str, Any], block_size: Any, use_diffusion: bool) -> BatchedPieces:
        pieces = BatchedPieces(request, usage, self.app.tokenizer, self.eos)
        with self.requests_changed:
            self.requests += 1
        self.incoming.put((pieces, block_size, use_diffusion))
        return pieces

    def ended(self) -> None:
        """A request left for good: its model-thread work (its row's removal, its cache's return) is done."""
        with self.requests_changed:
            self.requests -= 1
            self.requests_changed.notify_all()

    def wait_idle(self) -> None:
        """Wait until every request handed in has ended (a closed one leaves at the next step)."""
        with self.requests_changed:
            self.requests_changed.wait_for(lambda: self.requests == 0)

    def on_model_thread(self, fn, *args, **kwargs):
        return self.app.model_thread.submit(fn, *args, **kwargs).result()

    def run(self) -> None:
        while True:
            waiting = [self.incoming.get()]
            with self.app.lock:
                self.decoder = self.on_model_thread(BatchDecoder, self.app.model)
                rows: Dict[int, BatchedPieces] = {}
                while waiting or rows:
                    while not self.incoming.empty():
                        waiting.append(self.incoming.get())
                    self.admit(waiting, rows)
                    for uid in [uid for uid, pieces in rows.items() if pieces.closed]:
                        self.on_model_thread(self.decoder.remove, uid)
                        self.leave(rows, uid)
                    if rows:
                        self.step(rows)

    def admit(self, waiting: List[Any], rows: Dict[int, BatchedPieces]) -> None:
        while waiting and len(rows) < self.concurrency and len(self.decoder.waiting) < self.prompt_concurrency:
            pieces, block_size, use_diffusion = waiting.pop(0)
            if pieces.closed:
                pieces.end()
                self.ended()
                continue
            request = pieces.request
            sampling = {name: getattr(request.sampling, name) for name in SAMPLING_FIELDS}
            try:
                cache = self.on_model_thread(self.app.caches.lend, request.prompt)
                uid = self.on_model_thread(
                    self.decoder.insert, request.prompt, request.max_tokens, block_size=block_size,
                    eos_token_id=list(self.eos), use_diffusion=use_diffusion, logprobs=request.logprobs,
                    prompt_cache=cache.cache, **sampling,
                )
            except Exception as e:
                pieces.fail(e)
                self.ended()
                continue
            pieces.cache = cache
            pieces.usage["prompt_tokens_details"] = {"cached_tokens": len(cache)}
            rows[uid] = pieces

    def leave(self, rows: Dict[int, BatchedPieces], uid: int, last: Optional[Piece] = None) -> None:
        """Drop a row that has left the decoder and end its answer with `last`: its cache goes
        back to the pool first, so that a client's next turn, sent as soon as this one ends,
        finds it."""
        pieces = rows.pop(uid)
        try:
            self.on_model_thread(self.app.caches.give_back, pieces.cache, pieces.request.prompt, pieces.generated)
        except Exception as e:  # only the next turn's reuse is lost
            log.error("could not keep a batched request's prompt cache: %s", e)
        pieces.end(last)
        self.ended()

    def decode_step(self, rows: Dict[int, BatchedPieces]):
        """A decoder step and, per result, its tokens' logprob entries where the request asked
        (made here, on the model's thread, where the rows' arrays live). A newcomer may have
        two results in one step: its prefill's token, then its first decoding step's."""
        results: List[Emitted] = self.decoder.step()
        entries = []
        for uid, tokens, _, logprobs in results:
            top = rows[uid].request.top_logprobs if uid in rows else 0
            entries.append(None if logprobs is None else [
                logprob_entry(self.app.tokenizer, t, row, top) for t, row in zip(tokens, logprobs)
            ])
        return results, entries

    def step(self, rows: Dict[int, BatchedPieces]) -> None:
        try:
            results, entries = self.on_model_thread(self.decode_step, rows)
        except Exception as e:  # a bug: every request of the batch fails, the server keeps serving
            failed = list(rows.values())
            rows.clear()
            self.decoder = self.on_model_thread(BatchDecoder, self.app.model)
            for pieces in failed:
                pieces.fail(e)
                self.ended()
            return
        for (uid, tokens, finished, _), step_entries in zip(results, entries):
            pieces = rows.get(uid)
            if pieces is None:
                continue
            pieces.generated += tokens
            last = pieces.feed(tokens, step_entries)
            if last is not None or finished:
                if not finished:
                    self.on_model_thread(self.decoder.remove, uid)
                self.leave(rows, uid, last)
