"""Shared by the command tests: which checkpoint to run, and running `orthrus-mlx` as a process."""

import os
import subprocess
import sys
from pathlib import Path
from typing import List, Optional, Sequence

from orthrus_mlx.loader import DEFAULT_MODEL
from orthrus_mlx.testing import random_checkpoint

SHIPPED = (DEFAULT_MODEL / "config.json").is_file()


def checkpoint(tmp_path_factory) -> Path:
    """The shipped trained model when the repo has it, else a random one with a chat template."""
    if SHIPPED:
        return DEFAULT_MODEL
    return random_checkpoint(tmp_path_factory.mktemp("cli-model"), seed=11)


def cli_env() -> dict:
    return dict(os.environ, PYTHONIOENCODING="utf-8", PYTHONUNBUFFERED="1")


def run_cli(
    args: Sequence[str], stdin: Optional[str] = None, timeout: float = 60
) -> subprocess.CompletedProcess:
    """`python -m orthrus_mlx ARGS` as a real process; text is not newline-translated."""
    proc = subprocess.run(
        [sys.executable, "-m", "orthrus_mlx", *args],
        input=None if stdin is None else stdin.encode(),
        capture_output=True,
        timeout=timeout,
        env=cli_env(),
    )
    proc.stdout = proc.stdout.decode("utf-8")
    proc.stderr = proc.stderr.decode("utf-8")
    return proc


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def expected_prefill(prompt: List[int], cached: List[int]) -> int:
    """Tokens a turn must prefill when the cache holds `cached`: all past the common prefix, at least one."""
    return max(1, len(prompt) - common_prefix(prompt, cached))


def run_cli_many(cases: dict, timeout: float = 120) -> dict:
    """Run several `python -m orthrus_mlx` processes at once (their imports dominate); name -> result.

    `cases` maps a name to (args, stdin or None); args starting with a path run that program.
    """
    procs = {}
    for name, (args, stdin) in cases.items():
        argv = list(args) if args and os.sep in args[0] else [sys.executable, "-m", "orthrus_mlx", *args]
        procs[name] = (
            subprocess.Popen(
                argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=cli_env(),
            ),
            stdin,
        )
    results = {}
    for name, (proc, stdin) in procs.items():
        out, err = proc.communicate(None if stdin is None else stdin.encode(), timeout=timeout)
        results[name] = subprocess.CompletedProcess(
            proc.args, proc.returncode, out.decode("utf-8"), err.decode("utf-8")
        )
    return results
