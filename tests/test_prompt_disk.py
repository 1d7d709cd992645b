"""The prompt-cache pool's disk tier: a conversation evicted from memory, or from before a
restart, resumes from disk with the answer it would get from a full prefill; another model's,
a corrupt or a tampered file is never used; the folder keeps its byte bound."""

import pytest

from http_helpers import request
from orthrus_mlx import load, mlx_generate
from orthrus_mlx.prompt_cache import PromptCachePool
from orthrus_mlx.prompt_disk import DiskTier, model_fingerprint
from orthrus_mlx.testing import random_checkpoint
from server_fixtures import Served


@pytest.fixture(scope="module")
def model_tokenizer(tmp_path_factory):
    return load(random_checkpoint(tmp_path_factory.mktemp("disk-model"), seed=11))


def conversation(tokenizer, i: int, turns: int = 1):
    text = f"Conversation {i}: " + "tell me more about it " * 6
    return tokenizer.encode(text + " and then" * (turns - 1))


def answer(pool, model, prompt):
    """(tokens, how many prompt tokens came from a cache) for one request through `pool`."""
    pc = pool.take(prompt)
    new = pc.prepare(prompt)
    emitted = list(mlx_generate(model, new, max_tokens=6, prompt_cache=pc.cache))
    pool.commit(pc, prompt, emitted)
    return emitted, len(prompt) - len(new)


def fresh(model, prompt):
    return list(mlx_generate(model, prompt, max_tokens=6))


def test_an_evicted_conversation_resumes_from_disk(model_tokenizer, tmp_path):
    model, tokenizer = model_tokenizer
    pool = PromptCachePool(model, 1, disk=DiskTier(tmp_path, model, 10**9))
    first, second = conversation(tokenizer, 0), conversation(tokenizer, 1)
    answer(pool, model, first)
    assert len(pool.disk) == 0
    answer(pool, model, second)  # pushes the first conversation out of memory
    assert len(pool.disk) == 1
    follow_up = conversation(tokenizer, 0, turns=3)
    tokens, cached = answer(pool, model, follow_up)
    assert cached == len(first)  # its prompt came back from disk, not a prefill
    assert tokens == fresh(model, follow_up)


def test_a_restarted_server_finds_the_caches_of_the_last(model_tokenizer, tmp_path):
    model, tokenizer = model_tokenizer
    before = PromptCachePool(model, 2, disk=DiskTier(tmp_path, model, 10**9))
    prompts = [conversation(tokenizer, i) for i in range(2)]
    for prompt in prompts:
        answer(before, model, prompt)
    before.flush()  # what the server does when it stops
    after = PromptCachePool(model, 2, disk=DiskTier(tmp_path, model, 10**9))
    assert len(after.disk) == 2 and len(after) == 0
    for i in range(2):
        follow_up = conversation(tokenizer, i, turns=2)
        tokens, cached = answer(after, model, follow_up)
        assert cached == len(prompts[i]) and tokens == fresh(model, follow_up)


def test_another_models_caches_are_never_read(model_tokenizer, tmp_path, tmp_path_factory):
    model, tokenizer = model_tokenizer
    other, _ = load(random_checkpoint(tmp_path_factory.mktemp("other-model"), seed=12))
    assert model_fingerprint(other) != model_fingerprint(model)
    pool = PromptCachePool(model, 1, disk=DiskTier(tmp_path, model, 10**9))
    answer(pool, model, conversation(tokenizer, 0))
    pool.flush()
    theirs = DiskTier(tmp_path, other, 10**9)
    assert len(theirs) == 0
    # Even a file copied into its folder by hand is refused when loaded, not used.
    (mine,) = (tmp_path / model_fingerprint(model)).glob("*.safetensors")
    for suffix in (".safetensors", ".json"):
        target = theirs.folder / (mine.stem + suffix)
        target.write_bytes(mine.with_suffix(suffix).read_bytes())
    assert len(DiskTier(tmp_path, other, 10**9)) == 0  # its index names another model: dropped
    assert not list(theirs.folder.iterdir())


@pytest.mark.parametrize("damage", ["garbage", "truncated", "shapes"])
def test_a_damaged_file_means_a_prefill(model_tokenizer, tmp_path, damage):
    model, tokenizer = model_tokenizer
    prompt = conversation(tokenizer, 0)
    pool = PromptCachePool(model, 1, disk=DiskTier(tmp_path, model, 10**9))
    answer(pool, model, prompt)
    if damage == "shapes":  # a valid file holding fewer positions than its index claims
        pc = pool.caches[0]
        pc.prepare(prompt[:5])
        pc.tokens = list(prompt)
    pool.flush()
    (path,) = tmp_path.glob("*/*.safetensors")
    if damage == "garbage":
        path.write_bytes(b"\x00not a safetensors file" * 10)
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:200])
    restarted = PromptCachePool(model, 1, disk=DiskTier(tmp_path, model, 10**9))
    follow_up = conversation(tokenizer, 0, turns=2)
    tokens, cached = answer(restarted, model, follow_up)
    assert cached == 0 and tokens == fresh(model, follow_up)
    assert not path.exists()  # dropped, not tried again


def test_the_folder_keeps_its_byte_bound(model_tokenizer, tmp_path):
    model, tokenizer = model_tokenizer
    probe = PromptCachePool(model, 1, disk=DiskTier(tmp_path / "probe", model, 10**9))
    answer(probe, model, conversation(tokenizer, 0))
    probe.flush()
    one_entry = probe.disk.nbytes
    disk = DiskTier(tmp_path / "bounded", model, int(2.5 * one_entry))
    pool = PromptCachePool(model, 1, disk=disk)
    prompts = [conversation(tokenizer, i) for i in range(5)]
    for prompt in prompts:
        answer(pool, model, prompt)
    assert len(disk) == 2 and disk.nbytes <= 2.5 * one_entry
    def held(prompt):  # entries holding `prompt` (and the answer to it)
        return [t for t in disk.entries.values() if t[: len(prompt)] == prompt]

    assert len(held(prompts[2])) == len(held(prompts[3])) == 1  # the least recently used went first


def test_an_entry_a_conversation_extends_is_replaced(model_tokenizer, tmp_path):
    model, tokenizer = model_tokenizer
    pool = PromptCachePool(model, 1, disk=DiskTier(tmp_path, model, 10**9))
    first = conversation(tokenizer, 0)
    reply, _ = answer(pool, model, first)
    answer(pool, model, conversation(tokenizer, 1))
    next_turn = first + reply + tokenizer.encode(" and then?")
    answer(pool, model, next_turn)
    answer(pool, model, conversation(tokenizer, 1))
    extended = [t for t in pool.disk.entries.values() if t[: len(first)] == first]
    assert len(extended) == 1 and extended[0][: len(next_turn)] == next_turn


def test_server_resumes_an_evicted_conversation_from_disk(model_tokenizer, tmp_path):
    model, tokenizer = model_tokenizer
    chat = "/v1/chat/completions"

    def ask(served, i, turns):
        messages = [{"role": "user", "content": f"Conversation {i}: tell me more" + " and then" * turns}]
        status, body = request(served.address, "POST", chat, {"messages": messages, "max_tokens": 5})
        assert status == 200
        return body["choices"][0]["message"]["content"], body["usage"]["prompt_tokens_details"]["cached_tokens"]

    with Served(model, tokenizer) as plain:
        expected = ask(plain, 0, 4)[0]
    with Served(model, tokenizer, prompt_cache_size=1, prompt_cache_dir=str(tmp_path)) as served:
        ask(served, 0, 3)
        ask(served, 1, 3)  # evicts conversation 0 to disk
        text, cached = ask(served, 0, 4)
    assert text == expected and cached > 10
