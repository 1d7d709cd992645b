"""--decode-concurrency: concurrent requests of every kind (greedy, seeded sampled, logprobs,
penalties) decoded in one batch, each answer as the one-at-a-time path gives it alone."""

import json
import threading
from pathlib import Path

import numpy as np
import pytest

from http_helpers import request
from orthrus_mlx import load
from orthrus_mlx.batch import BatchDecoder
from server_fixtures import Served

TINY = Path(__file__).resolve().parents[1] / "orthrus_mlx" / "assets" / "orthrus-tiny"
BODIES = [
    {"prompt": "def add(a, b):", "max_tokens": 24},
    {"prompt": "import os\nimport sys\n\nclass Loader:", "max_tokens": 30, "stream": True,
     "temperature": 0.7, "top_p": 0.9, "seed": 3},
    {"prompt": "x = [", "max_tokens": 12, "stop": ["0x"], "logprobs": 3, "presence_penalty": 0.5},
    {"prompt": "for i in range(10):\n    print(i)", "max_tokens": 20, "stream": True, "logprobs": 2,
     "temperature": 0.9, "top_k": 40, "min_p": 0.05, "seed": 8, "repetition_penalty": 1.2,
     "frequency_penalty": 0.3, "logit_bias": {"32": 1.5}},
]


@pytest.fixture(scope="module")
def tiny():
    return load(TINY)


def answer(server, body):
    """(text, finish_reason, logprob entries) of a completion, whole or streamed."""
    status, data = request(server, "POST", "/v1/completions", body)
    assert status == 200, data
    if not body.get("stream"):
        choice = data["choices"][0]
        return choice["text"], choice["finish_reason"], (choice["logprobs"] or {}).get("content")
    events = [json.loads(line[6:]) for line in data.splitlines() if line.startswith("data: {")]
    choices = [e["choices"][0] for e in events if e["choices"]]
    entries = [entry for c in choices for entry in (c["logprobs"] or {}).get("content", [])]
    return "".join(c["text"] for c in choices), choices[-1]["finish_reason"], entries if body.get("logprobs") else None


def same_logprobs(batched, alone) -> bool:
    """Entries with the same tokens and alternatives, their values within 1e-5."""
    if alone is None or batched is None:
        return batched is alone
    ids = lambda entries: [(e["id"], [t["id"] for t in e["top_logprobs"]]) for e in entries]
    values = lambda entries: [[e["logprob"]] + [t["logprob"] for t in e["top_logprobs"]] for e in entries]
    return ids(batched) == ids(alone) and all(
        np.allclose(b, a, atol=1e-5, rtol=0) for b, a in zip(values(batched), values(alone))
    )


def test_concurrent_clients_get_their_alone_answers(tiny, monkeypatch):
    with Served(*tiny) as served:  # one at a time (--decode-concurrency 1)
        alone = [answer(served.address, body) for body in BODIES]

    batches = []  # per batch step, what each active row is: (sampled, logprobs, processors)
    step = BatchDecoder.step

    def recording_step(self):
        batches.append([(not r.params.greedy, r.backend.logprobs, bool(r.backend.processors)) for r in self.active])
        return step(self)

    monkeypatch.setattr(BatchDecoder, "step", recording_step)
    results = [None] * len(BODIES)
    with Served(*tiny, decode_concurrency=4, prompt_concurrency=2) as served:
        def client(i):
            results[i] = answer(served.address, BODIES[i])

        threads = [threading.Thread(target=client, args=(i,)) for i in range(len(BODIES))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
    assert [r[:2] for r in results] == [a[:2] for a in alone]
    assert all(same_logprobs(r[2], a[2]) for r, a in zip(results, alone))
    assert alone[2][:2] == ("1] + (0, 1, ", "stop") and alone[2][2] and alone[3][2]
    # Every kind of request decoded in one pass with others, not one after another.
    together = [rows for rows in batches if len(rows) >= 2]
    assert {kind for rows in together for kind in rows} >= {
        (False, False, False), (True, False, False), (False, True, True), (True, True, True)
    }


def completion(server, body):
    """(text, usage) of a completion, whole or streamed (with the usage chunk)."""
    status, data = request(server, "POST", "/v1/completions", body)
    assert status == 200, data
    if not body.get("stream"):
        return data["choices"][0]["text"], data["usage"]
    events = [json.loads(line[6:]) for line in data.splitlines() if line.startswith("data: {")]
    return "".join(e["choices"][0]["text"] for e in events if e["choices"]), events[-1]["usage"]


def test_batched_turns_reuse_the_prompt_cache_pool(tiny, tmp_path):
    """Three clients, two turns each, side by side: turn 2 prefills only what turn 1 did not
    leave in the pool (a pool of 2, so some come back from the disk tier), and every answer is
    the one-at-a-time server's."""
    firsts = [
        {"prompt": "def add(a, b):", "max_tokens": 16},
        {"prompt": "import os\nimport sys\n\nclass Loader:", "max_tokens": 20, "temperature": 0.8, "seed": 5,
         "stream": True, "stream_options": {"include_usage": True}},
        {"prompt": "for i in range(10):\n    print(i)", "max_tokens": 12, "stop": ["\n\n"]},
    ]
    turns = [[None, None] for _ in firsts]
    barrier = threading.Barrier(len(firsts))
    with Served(*tiny, decode_concurrency=4, prompt_concurrency=2, prompt_cache_size=2,
                prompt_cache_dir=str(tmp_path)) as served:
        def client(i):
            turns[i][0] = completion(served.address, firsts[i])
            barrier.wait(timeout=120)  # every turn 2 arrives while the others decode
            second = dict(firsts[i], prompt=firsts[i]["prompt"] + turns[i][0][0] + "\n# next")
            turns[i][1] = completion(served.address, second)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(len(firsts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        held = sorted(len(pc) for pc in served.app.caches.caches)

    # The pool (of 2) holds whole turn-2 conversations, as their rows left the batch.
    assert len(held) == 2 and set(held) <= {second[1]["total_tokens"] - 1 for _, second in turns}
    with Served(*tiny) as served:  # fresh, one at a time
        alone = [completion(served.address, body)[0] for body in firsts]
        alone += [completion(served.address, dict(body, prompt=body["prompt"] + first + "\n# next"))[0]
                  for body, first in zip(firsts, alone)]
    assert [t[0][0] for t in turns] + [t[1][0] for t in turns] == alone
    for body, (first, second) in zip(firsts, turns):
        assert first[1]["prompt_tokens_details"]["cached_tokens"] == 0
        # All turn 1 left: its prompt and answer but the last token, which it never saw.
        assert second[1]["prompt_tokens_details"]["cached_tokens"] == first[1]["total_tokens"] - 1
    assert list(tmp_path.rglob("*.safetensors"))  # the pool of 2 spilled to disk
