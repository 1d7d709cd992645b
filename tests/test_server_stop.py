"""Stopping an in-process server leaves none of its work running: a generation whose client left
is closed, on the model's thread, before `stop` returns (the caller's next MLX work must not
overlap it: MLX is not safe to drive from two threads at once)."""

import json
import socket
import threading
import time

from mlx_lm.generate import GenerationResponse

from orthrus_mlx import load
from orthrus_mlx.cli import server as server_module
from orthrus_mlx.testing import random_checkpoint
from server_fixtures import Served


def test_stop_waits_for_the_generation_of_a_client_that_left(tmp_path, monkeypatch):
    closed = threading.Event()

    def slow_answer(model, tokenizer, prompt, max_tokens=256, **kwargs):
        try:
            for i in range(max_tokens):
                time.sleep(0.01)
                yield GenerationResponse(
                    text="x", token=120, logprobs=None, from_draft=False, prompt_tokens=len(prompt),
                    prompt_tps=0.0, generation_tokens=i + 1, generation_tps=0.0, peak_memory=0.0,
                    finish_reason="length" if i == max_tokens - 1 else None,
                )
        finally:
            time.sleep(1.5)  # a generation's close takes a while (the prompt cache's commit)
            closed.set()

    monkeypatch.setattr(server_module, "stream_generate", slow_answer)
    body = json.dumps({"prompt": "hello", "max_tokens": 200, "stream": True}).encode()
    with Served(*load(random_checkpoint(tmp_path / "m", seed=3))) as served:
        with socket.create_connection(served.address, timeout=30) as s:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            started = b""
            while b"data: " not in started:  # the answer has started
                started += s.recv(65536)
        assert not closed.is_set()  # the client left mid-answer; the server has yet to notice
    assert closed.is_set()
