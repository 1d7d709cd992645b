"""`orthrus-mlx chat`: answers equal fresh runs on the whole history, later turns prefill only new tokens."""

import fcntl
import io
import os
import pty
import re
import select
import subprocess
import sys
import termios
import time

import pytest

from cli_helpers import SHIPPED, cli_env, expected_prefill, run_cli_many
from orthrus_mlx import generate, mlx_generate
from orthrus_mlx.cli import main
from orthrus_mlx.cli.chat import ChatSession
from orthrus_mlx.cli.flags import chat_prompt

MAX_TOKENS = 16
SYSTEM = "You are a helpful assistant."
QUESTIONS = ["What is the capital of France?", "And of Italy?", "Which one is bigger?"]
FOOTER = re.compile(r"\n(\[(\d+) new prompt tokens \((\d+) cached\)[^\n]*\])\n")
STATS = re.compile(r"\[(\d+) turns, (\d+) tokens in the cache[^\n]*\]\n")


@pytest.fixture(scope="module")
def runs(model_path):
    args = ["chat", "--model", str(model_path), "-m", str(MAX_TOKENS), "--system-prompt", SYSTEM]
    script = "\n".join([QUESTIONS[0], QUESTIONS[1], "/stats", QUESTIONS[2], "/stats", "/reset",
                        QUESTIONS[0], "/quit", "never read"]) + "\n"
    return run_cli_many({"scripted": (args, script)})


def parse_turns(stdout: str):
    """[(answer, footer, prefilled, cached)] and the /stats lines, from the scripted chat's stdout."""
    turns, stats = [], []
    pos = 0
    while pos < len(stdout):
        m = STATS.match(stdout, pos)
        if m:
            stats.append((int(m.group(1)), int(m.group(2))))
            pos = m.end()
            continue
        if stdout.startswith("[conversation reset]\n", pos):
            turns.append(None)
            pos += len("[conversation reset]\n")
            continue
        m = FOOTER.search(stdout, pos)
        assert m, f"no footer after {stdout[pos:]!r}"
        turns.append((stdout[pos : m.start()], m.group(1), int(m.group(2)), int(m.group(3))))
        pos = m.end()
    return turns, stats


def fresh(loaded, messages):
    """What a fresh run on the whole history answers: its prompt, emitted tokens and text."""
    model, tokenizer = loaded
    prompt = chat_prompt(tokenizer, [{"role": "system", "content": SYSTEM}] + messages, {})
    tokens = list(mlx_generate(model, prompt, tokenizer.eos_token_ids, MAX_TOKENS))
    text = generate(model, tokenizer, prompt, max_tokens=MAX_TOKENS)
    return prompt, tokens, text


def test_three_turns_equal_fresh_runs_and_prefill_only_new_tokens(runs, loaded):
    out = runs["scripted"]
    assert out.returncode == 0, out.stderr
    turns, stats = parse_turns(out.stdout)
    assert len(turns) == 5 and turns[3] is None  # three turns, /reset, one more turn
    messages, cached, previous_prompt_length = [], [], 0
    for i, question in enumerate(QUESTIONS):
        answer, footer, prefilled, was_cached = turns[i]
        messages.append({"role": "user", "content": question})
        prompt, tokens, text = fresh(loaded, messages)
        assert answer == text, f"turn {i + 1}"
        assert prefilled == expected_prefill(prompt, cached), f"turn {i + 1}: {footer}"
        assert prefilled + was_cached == len(prompt)
        if i > 0:
            # The earlier prompt comes from the cache; so does the earlier answer, as far as its
            # text re-encodes to the tokens emitted (a random model's bytes often do not).
            assert was_cached >= previous_prompt_length
            if SHIPPED:
                assert prefilled < len(prompt) - previous_prompt_length
        assert f"{len(tokens)} tokens" in footer and ("| length |" in footer or "| stop |" in footer)
        messages.append({"role": "assistant", "content": answer})
        cached = prompt + tokens[:-1]
        previous_prompt_length = len(prompt)
    # /stats after turns 2 and 3: the cache holds each turn's prompt and its answer but the last token.
    assert [s[0] for s in stats] == [2, 3]
    assert stats[1][1] == len(cached)
    # After /reset the first question is prefilled in full again and answered the same.
    answer, _, prefilled, was_cached = turns[4]
    assert (answer, was_cached) == (turns[0][0], 0) and prefilled == turns[0][2]


def test_end_of_input_ends_the_session(model_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO(QUESTIONS[0] + "\n\n/help\n"))
    assert main(["chat", "--model", str(model_path), "-m", "4"]) == 0
    out = capsys.readouterr().out
    assert out.count(" new prompt tokens (0 cached)") == 1 and "/reset" in out


def read_until(fd: int, pattern: str, out: str, since: int = None, timeout: float = 60) -> str:
    """Read the terminal's output onto `out` until `pattern` (a regex) matches past `since`."""
    since = len(out) if since is None else since
    deadline = time.time() + timeout
    while not re.search(pattern, out[since:]):
        assert time.time() < deadline, f"no {pattern!r} in {out[since:]!r}"
        if select.select([fd], [], [], 0.5)[0]:
            out += os.read(fd, 65536).decode("utf-8", "replace")
    return out


def test_terminal_ctrl_c_stops_the_answer_not_the_session(model_path):
    """On a pseudo-terminal: Ctrl-C mid-answer, the next turn reuses the cache, Ctrl-D ends."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "orthrus_mlx", "chat", "--model", str(model_path), "-m", "400"],
        stdin=slave, stdout=slave, stderr=slave, env=cli_env(), close_fds=True,
        # The pty becomes the chat's controlling terminal, so ^C there is a real Ctrl-C.
        start_new_session=True, preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0),
    )
    os.close(slave)

    # Type only at the ">> " prompt: a Ctrl-C would flush a line typed ahead of it.
    def interrupted_turn(message: bytes, out: str):
        """Send a message, press Ctrl-C once its answer starts; the turn's footer and the output."""
        start = len(out)
        os.write(master, message + b"\n")
        out = read_until(master, re.escape(message.decode()) + r"\r?\n.", out)
        os.write(master, b"\x03")
        # Searched from `start`: a quick answer may have shown its footer already.
        out = read_until(master, r"\n(\[[^\n]* new prompt tokens [^\n]*\])\r?\n[\s\S]*>> ", out, start)
        return re.findall(r"\[\d+ new prompt tokens [^\n]*\]", out[start:])[0], out

    try:
        out = read_until(master, r">> ", "")
        # A model may finish an answer before the keypress lands: then ask again.
        for message in (b"Tell me a long story.", b"Please go on.", b"Tell me another one."):
            footer, out = interrupted_turn(message, out)
            if "| stopped |" in footer:
                break
        assert "| stopped |" in footer, out
        assert 1 <= int(re.search(r"\| (\d+) tokens, ", footer).group(1)) < 400
        os.write(master, b"/stats\n")
        out = read_until(master, r"\[\d turns, \d+ tokens in the cache[^\n]*\n[\s\S]*>> ", out)
        footer, out = interrupted_turn(b"And then?", out)
        assert int(re.search(r"new prompt tokens \((\d+) cached\)", footer).group(1)) > 0
        os.write(master, b"\x04")
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)


def test_a_stopped_answer_keeps_the_cache_consistent(loaded):
    """Stopping mid-answer (what Ctrl-C does) leaves the cache holding exactly what was shown."""
    model, tokenizer = loaded
    session = ChatSession(model, tokenizer, max_tokens=MAX_TOKENS, generation={}, system_prompt=SYSTEM)
    seen = []
    for text in session.reply(QUESTIONS[0], should_stop=lambda: len(seen) >= 3):
        seen.append(text)
    turn = session.turns[-1]
    assert turn.finish_reason is None and turn.tokens == 3 and "stopped" in turn.footer()
    layers = {c.offset for c in session.cache.cache}
    assert layers == {len(session.cache.tokens)}
    prompt = chat_prompt(
        tokenizer, [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTIONS[0]}], {}
    )
    assert session.cache.tokens[: len(prompt)] == prompt
    assert len(session.cache.tokens) <= turn.prompt_tokens + 3

    answer = "".join(session.reply(QUESTIONS[1]))
    messages = [{"role": "user", "content": QUESTIONS[0]}, {"role": "assistant", "content": "".join(seen)},
                {"role": "user", "content": QUESTIONS[1]}]
    assert answer == fresh(loaded, messages)[2]
    assert session.turns[-1].cached > 0

    session.reset()
    assert session.messages == [] and len(session.cache) == 0
    assert all(c.offset == 0 for c in session.cache.cache)
