"""`orthrus-mlx generate` and the entry point: real processes, plus in-process `main()` for flag checks."""

import shutil
import sys
from pathlib import Path

import pytest

from cli_helpers import SHIPPED, run_cli_many
from orthrus_mlx import generate
from orthrus_mlx.cli import COMMANDS, main
from orthrus_mlx.cli.flags import chat_prompt, command_block_size

MAX_TOKENS = 12
PROMPT = "Tell me about the sea."
SAMPLING = ["--temp", "0.9", "--top-p", "0.95", "--top-k", "50", "--seed", "7"]


@pytest.fixture(scope="module")
def runs(model_path):
    """Every subprocess of this module, started together: each one's imports take seconds."""
    m = ["--model", str(model_path), "-m", str(MAX_TOKENS)]
    # With the shipped checkpoint in the repo, the plain run also checks that it is the default.
    plain = ["-m", str(MAX_TOKENS)] if SHIPPED else m
    cases = {
        "plain": (["generate", *plain, "--prompt", PROMPT], None),
        "verbose-stdin": ([console_script(), "generate", *m, "--prompt", "-", "--verbose"], PROMPT),
        "bad-flag": ([console_script(), "generate", "--bogus"], None),
    }
    return run_cli_many(cases)


def console_script() -> str:
    found = shutil.which("orthrus-mlx")
    return str(Path(found).resolve()) if found else str(Path(sys.executable).parent / "orthrus-mlx")


def expected_text(loaded, message: str, system: str = None, **kwargs) -> str:
    model, tokenizer = loaded
    messages = [{"role": "user", "content": message}]
    if system is not None:
        messages.insert(0, {"role": "system", "content": system})
    prompt = chat_prompt(tokenizer, messages, {})
    return generate(model, tokenizer, prompt, max_tokens=MAX_TOKENS, **kwargs)


def test_generate_prints_the_engines_text(runs, loaded):
    """On the shipped checkpoint, without --model (it is the default); else on a random one."""
    out = runs["plain"]
    assert out.returncode == 0, out.stderr
    assert out.stdout == expected_text(loaded, PROMPT) + "\n"


def test_sampling_flags_reach_the_engine(model_path, loaded, capsys):
    args = ["generate", "--model", str(model_path), "-p", PROMPT, "-m", str(MAX_TOKENS), *SAMPLING]
    assert main(args) == 0
    expected = expected_text(loaded, PROMPT, temperature=0.9, top_p=0.95, top_k=50, seed=7)
    assert capsys.readouterr().out == expected + "\n"


def test_verbose_prints_the_figures_and_prompt_dash_reads_stdin(runs, loaded):
    out = runs["verbose-stdin"]
    assert out.returncode == 0, out.stderr
    text, _, figures = out.stdout.partition("\n==========\n")
    assert text == expected_text(loaded, PROMPT)
    lines = figures.splitlines()
    assert lines[0].startswith("Prompt: ") and lines[0].endswith("tokens-per-sec")
    assert lines[1].startswith("Generation: ") and lines[1].endswith("tokens-per-sec")
    assert lines[2].startswith("Orthrus: ") and lines[2].endswith("tokens-per-step")
    assert lines[3].startswith("Peak memory: ") and lines[3].endswith(" GB")


def test_bad_flag_process_exits_2_with_one_line(runs):
    out = runs["bad-flag"]
    assert out.returncode == 2
    assert out.stdout == ""
    assert out.stderr.count("\n") == 1
    assert "error: unrecognized arguments: --bogus" in out.stderr


def test_system_prompt_and_no_diffusion(model_path, loaded, capsys):
    args = ["generate", "--model", str(model_path), "-p", PROMPT, "-m", str(MAX_TOKENS)]
    assert main(args + ["--system-prompt", "Be brief.", "--no-diffusion", "--verbose"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(expected_text(loaded, PROMPT, system="Be brief.") + "\n==========\n")
    assert "1.00 tokens-per-step" in out


@pytest.mark.parametrize(
    "args, status, message",
    [
        (["generate", "--max-tokens", "many"], 2, "--max-tokens"),
        (["generate", "--enable-thinking", "maybe"], 2, "unrecognized arguments: maybe"),
        (["generate", "--chat-template-args", "{not json"], 2, "--chat-template-args"),
        (["generate", "--chat-template-args", "[1]"], 2, "expected a JSON object"),
        (["generate", "--temp", "-1"], 1, "temperature must be in [0, 100]"),
        (["generate", "--top-p", "1.5"], 1, "top_p must be in (0, 1]"),
        (["generate", "--max-tokens", "-3"], 1, "--max-tokens must be >= 0"),
        (["generate", "--block-size", "0"], 2, "--block-size"),
        (["generate", "--seed", "-1"], 1, "--seed must be in"),
        (["generate", "--model", "/no/such/model"], 1, "No model folder"),
        (["chat", "--top-k", "-1"], 1, "top_k must be an integer >= 0"),
        (["server", "--port", "http"], 2, "--port"),
        (["frobnicate"], 2, "invalid choice"),
    ],
)
def test_bad_flags_exit_nonzero_with_one_line(args, status, message, capsys):
    try:
        code = main(args)
    except SystemExit as e:  # argparse's own exit
        code = e.code
    out, err = capsys.readouterr()
    assert code == status
    assert out == ""
    assert err.count("\n") == 1, err
    assert message in err and "error" in err


def test_missing_optional_command_says_not_available(capsys, monkeypatch):
    monkeypatch.setitem(COMMANDS, "bench", ("orthrus_mlx.no_such_module", "not installed here"))
    assert main(["bench"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "orthrus-mlx bench: error: not available" in err


def test_help_lists_the_commands_and_flags(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    top = capsys.readouterr().out
    for command in ("generate", "chat", "server", "convert", "bench"):
        assert command in top
    with pytest.raises(SystemExit) as e:
        main(["generate", "--help"])
    assert e.value.code == 0
    help_text = capsys.readouterr().out
    for flag in ("--max-tokens", "--temp", "--top-p", "--top-k", "--seed", "--system-prompt",
                 "--chat-template-args", "--enable-thinking", "--no-diffusion", "--verbose"):
        assert flag in help_text


def test_commands_default_to_auto_unless_a_seeded_sample_must_reproduce():
    assert command_block_size(None, 0.0, None) == "auto"
    assert command_block_size(None, 0.0, 7) == "auto"  # greedy: the schedule cannot change the tokens
    assert command_block_size(None, 0.8, None) == "auto"
    assert command_block_size(None, 0.8, 7) is None  # the checkpoint's K
    assert command_block_size(4, 0.8, 7) == 4 and command_block_size("auto", 0.8, 7) == "auto"


def test_bare_command_lists_the_commands_and_exits_0(capsys):
    assert main([]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    for name, (_, help) in COMMANDS.items():
        assert f"{name:<10} {help}" in out


def test_version_is_the_installed_one_else_the_source_trees(capsys, monkeypatch):
    import importlib.metadata

    import orthrus_mlx

    try:
        installed = importlib.metadata.version("orthrus-mlx")
    except importlib.metadata.PackageNotFoundError:
        installed = orthrus_mlx.__version__
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out == f"orthrus-mlx {installed}\n"

    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", not_installed)
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out == f"orthrus-mlx {orthrus_mlx.__version__}\n"


def test_auto_says_on_stderr_when_it_measures_step_costs(model_path, capsys):
    args = ["generate", "--model", str(model_path), "--prompt", "def f(x):", "-m", "4"]
    assert main(args) == 0  # the default --block-size auto, in a fresh HOME: measures
    out, err = capsys.readouterr()
    assert err.count("measuring what a step of") == 1 and "measuring" not in out
    assert main(args) == 0  # measured already: silent
    assert "measuring" not in capsys.readouterr().err
