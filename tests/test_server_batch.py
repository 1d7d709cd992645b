"""--decode-concurrency: concurrent greedy requests decoded in one batch, each answer as alone."""

import json
import threading
from pathlib import Path

import pytest

from http_helpers import request
from orthrus_mlx import load
from orthrus_mlx.batch import BatchDecoder
from server_fixtures import Served

TINY = Path(__file__).resolve().parents[1] / "orthrus_mlx" / "assets" / "orthrus-tiny"
BODIES = [
    {"prompt": "def add(a, b):", "max_tokens": 24},
    {"prompt": "import os\nimport sys\n\nclass Loader:", "max_tokens": 30, "stream": True},
    {"prompt": "x = [", "max_tokens": 12, "stop": ["+1+"]},
    {"prompt": "for i in range(10):\n    print(i)", "max_tokens": 20, "stream": True},
]


@pytest.fixture(scope="module")
def tiny():
    return load(TINY)


def answer(server, body):
    """(text, finish_reason) of a completion, whole or streamed."""
    status, data = request(server, "POST", "/v1/completions", body)
    assert status == 200, data
    if not body.get("stream"):
        return data["choices"][0]["text"], data["choices"][0]["finish_reason"]
    events = [json.loads(line[6:]) for line in data.splitlines() if line.startswith("data: {")]
    text = "".join(e["choices"][0]["text"] for e in events if e["choices"])
    return text, events[-1]["choices"][0]["finish_reason"]


def test_concurrent_clients_get_their_alone_answers(tiny, monkeypatch):
    with Served(*tiny) as served:
        alone = [answer(served.address, body) for body in BODIES]

    batch_sizes = []
    step = BatchDecoder.step

    def counting_step(self):
        batch_sizes.append(len(self.active))
        return step(self)

    monkeypatch.setattr(BatchDecoder, "step", counting_step)
    results = [None] * len(BODIES)
    with Served(*tiny, decode_concurrency=4, prompt_concurrency=2) as served:
        def client(i):
            results[i] = answer(served.address, BODIES[i])

        threads = [threading.Thread(target=client, args=(i,)) for i in range(len(BODIES))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        # A sampled request keeps the one-at-a-time path, after the batch.
        sampled = answer(served.address, dict(BODIES[0], temperature=0.7, seed=1))
    assert results == alone
    assert max(batch_sizes) >= 2  # decoded together, not one after another
    assert alone[2] == ("1] + (1", "stop")
    assert isinstance(sampled[0], str) and sampled[1] in ("stop", "length")
