"""Hostile input to the commands, as real processes: bytes that are not UTF-8 on stdin and in
arguments, chat templates that raise, template arguments that clash, corrupt model folders.

`generate` answers each with one line on stderr and exit status 1 (2 for a bad flag), never a
traceback; `chat` reports the bad line and keeps its conversation (and its KV cache).
The processes run side by side: their imports dominate.
"""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import pytest

from cli_helpers import cli_env
from orthrus_mlx.cli import main
from orthrus_mlx.testing import CHAT_TEMPLATE, random_checkpoint, random_weights, save_checkpoint, tiny_config

# Raises for one message only, so that a chat can go on after it.
RAISING_TEMPLATE = (
    "{% for message in messages %}{% if 'boom' in message['content'] %}"
    "{{ raise_exception('no boom here') }}{% endif %}{% endfor %}" + CHAT_TEMPLATE
)
FOOTER = re.compile(r"^\[(\d+) new prompt tokens \((\d+) cached\)", re.M)
Arg = Union[str, bytes]


def with_template(folder: Path, template: str) -> Path:
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = template
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    good = random_checkpoint(root / "good", seed=5)
    nan = random_weights(tiny_config(), seed=5)
    nan["model.layers.0.mlp.down_proj.weight"][1, 2] = np.nan
    outside = random_checkpoint(root / "outside", seed=5, shards=2)
    index = json.loads((outside / "model.safetensors.index.json").read_text())
    index["weight_map"] = {k: "/etc/passwd" for k in index["weight_map"]}
    (outside / "model.safetensors.index.json").write_text(json.dumps(index))
    return {
        "good": good,
        "raising": with_template(shutil.copytree(good, root / "raising"), RAISING_TEMPLATE),
        "unparsable": with_template(shutil.copytree(good, root / "unparsable"), "{% for %}"),
        "nan": save_checkpoint(root / "nan", tiny_config(), nan),
        "outside": outside,
    }


def run_all(cases: Dict[str, Tuple[Sequence[Arg], Optional[bytes]]]) -> Dict[str, subprocess.CompletedProcess]:
    """`python -m orthrus_mlx ARGS` for every case at once; arguments and stdin may be raw bytes."""
    procs = {
        name: subprocess.Popen(
            [sys.executable.encode(), b"-m", b"orthrus_mlx", *[os.fsencode(a) for a in args]],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=cli_env(),
        )
        for name, (args, _) in cases.items()
    }
    results = {}
    for name, proc in procs.items():
        out, err = proc.communicate(cases[name][1] or b"", timeout=300)
        results[name] = subprocess.CompletedProcess(
            proc.args, proc.returncode, out.decode("utf-8", "replace"), err.decode("utf-8", "replace")
        )
    return results


def command(models: Dict[str, Path], name: str, model: str, *args: Arg) -> List[Arg]:
    return [name, "--model", str(models[model]), "-m", "3", *args]


# Where the process matters (bytes on a real pipe or in argv): separate processes, side by side.
# name -> (command, model, arguments, stdin, exit status, what the one line on stderr says)
PROCESS_CASES = {
    "stdin_not_utf8": ("generate", "good", ["--prompt", "-"], b"hi \xff\xfe there", 1,
                       "The prompt on stdin is not UTF-8 text: byte 0xff at offset 3"),
    "prompt_arg_not_utf8": ("generate", "good", ["--prompt", b"caf\xe9"], None, 1, "--prompt is not UTF-8 text"),
}
# The rest run `main` in this process: the same code once imported, without paying the imports
# again. Python keeps argv bytes that are not UTF-8 as lone surrogates, as "\udcc3" here.
IN_PROCESS_CASES = {
    "system_prompt_not_utf8": ("generate", "good", ["--system-prompt", "\udcc3("], 1,
                               "--system-prompt is not UTF-8 text"),
    "template_raises": ("generate", "raising", ["--prompt", "boom"], 1, "The chat template failed: no boom here"),
    "template_unparsable": ("generate", "unparsable", [], 1, "The chat template failed:"),
    "template_args_clash": ("generate", "good", ["--chat-template-args", '{"tokenize": true}'], (1, 2), "tokenize"),
    "template_args_not_json": ("generate", "good", ["--chat-template-args", "{"], 2, "not valid JSON"),
    "nan_weights": ("generate", "nan", [], 1,
                    "NaN or infinite values in 1 tensor(s): ['model.layers.0.mlp.down_proj.weight']"),
    "index_outside_folder": ("generate", "outside", [], 1, "in /etc/passwd; a shard must be a file name"),
    "chat_system_prompt_not_utf8": ("chat", "good", ["--system-prompt", "\udcff"], 1,
                                    "--system-prompt is not UTF-8 text"),
}
CHAT_LINES = b"hello\nbad \xff line\nagain\n/stats\n"
BOOM_LINES = b"hello\nboom\nagain\n/stats\n"


@pytest.fixture(scope="module")
def runs(models):
    cases = {
        name: (command(models, cmd, model, *args), stdin)
        for name, (cmd, model, args, stdin, _, _) in PROCESS_CASES.items()
    }
    cases["chat_not_utf8"] = (command(models, "chat", "good"), CHAT_LINES)
    cases["chat_template_raises"] = (command(models, "chat", "raising"), BOOM_LINES)
    return run_all(cases)


def assert_one_line_error(returncode: int, stderr: str, status, message: str, name: str) -> None:
    statuses = status if isinstance(status, tuple) else (status,)
    assert returncode in statuses, (returncode, stderr)
    assert "Traceback" not in stderr, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"orthrus-mlx {name}: error:"), stderr
    assert message in lines[0], (message, lines[0])


@pytest.mark.parametrize("case", sorted(PROCESS_CASES))
def test_generate_process_answers_bad_bytes_with_one_line(runs, case):
    name, _, _, _, status, message = PROCESS_CASES[case]
    assert_one_line_error(runs[case].returncode, runs[case].stderr, status, message, name)
    assert runs[case].stdout == ""


@pytest.mark.parametrize("case", sorted(IN_PROCESS_CASES))
def test_commands_answer_hostile_input_with_one_line(models, case, capsys):
    name, model, args, status, message = IN_PROCESS_CASES[case]
    try:
        returncode = main(command(models, name, model, *args))
    except SystemExit as e:  # argparse's own exit for a bad flag
        returncode = e.code
    captured = capsys.readouterr()
    assert_one_line_error(returncode, captured.err, status, message, name)
    assert captured.out == ""


def assert_conversation_went_on(result: subprocess.CompletedProcess, error: str) -> None:
    """Turns 1 and 3 answered, turn 2 reported; turn 3 reused the cache of turn 1."""
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stdout.splitlines() if line.startswith("[error:")]
    assert errors == [error], result.stdout
    footers = FOOTER.findall(result.stdout)
    assert len(footers) == 2 and int(footers[0][1]) == 0 and int(footers[1][1]) > 0, result.stdout
    assert "[2 turns," in result.stdout
    assert result.stdout.index(footers[0][0]) < result.stdout.index(error) < result.stdout.rindex("[2 turns,")


def test_chat_reports_a_line_that_is_not_utf8_and_goes_on(runs):
    assert_conversation_went_on(
        runs["chat_not_utf8"], "[error: Input line 2 is not UTF-8 text: byte 0xff at offset 4]"
    )


def test_chat_reports_a_template_that_raises_and_goes_on(runs):
    assert_conversation_went_on(runs["chat_template_raises"], "[error: The chat template failed: no boom here]")


def test_convert_answers_hostile_input_with_one_line(models, tmp_path, monkeypatch, capsys):
    """`orthrus-mlx convert` (in this process: the same code after the imports)."""
    thesis = tmp_path / "thesis"
    (thesis / "photos").mkdir(parents=True)
    (thesis / "thesis.txt").write_text("years of work")
    monkeypatch.chdir(thesis)
    cases = [
        (["--hf-path", str(models["outside"]), "--mlx-path", str(tmp_path / "out")], "in /etc/passwd"),
        (["--hf-path", str(models["good"]), "--mlx-path", str(thesis), "--force"], "is the current folder"),
        (["--hf-path", str(models["good"]), "--mlx-path", ".", "--force"], "is the current folder"),
        (["--hf-path", str(models["good"]), "--mlx-path", str(thesis / "photos"), "--force"],
         "--force replaces only a model folder, and --mlx-path"),
        (["--hf-path", str(models["nan"]), "--mlx-path", str(tmp_path / "out")], "NaN or infinite values"),
    ]
    (thesis / "photos" / "cat.jpg").write_text("meow")
    for argv, message in cases:
        assert main(["convert", *argv, "--no-progress"]) == 1
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("orthrus-mlx convert: error:"), lines
        assert message in lines[0], (message, lines[0])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["thesis"]
    assert (thesis / "thesis.txt").read_text() == "years of work" and (thesis / "photos" / "cat.jpg").exists()
