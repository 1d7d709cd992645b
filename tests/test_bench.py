"""`orthrus-mlx bench` end to end on a tiny random checkpoint (no timing assertions)."""

import importlib.util
import json
import sys

import pytest

from orthrus_mlx.cli import bench, main
from orthrus_mlx.cli.bench import parse_block_sizes, parse_modes
from orthrus_mlx.testing import random_checkpoint, tiny_config


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench-model")
    random_checkpoint(path, tiny_config(block_size=4), seed=5)
    with open(path / "heldout_prompts.json", "w") as f:  # the shipped layout: objects with "text"
        json.dump([{"source": "a", "text": "def add(a, b):\n"}, {"source": "b", "text": "hello"}], f)
    return path


def test_bench_reports_every_mode_with_mlx_lms_tokens(model_path, tmp_path, capsys):
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    plot = importlib.util.find_spec("matplotlib") is not None
    args = ["bench", "--model", str(model_path), "--num-prompts", "2", "--max-tokens", "8",
            "--repeats", "1", "--modes", "mlx-lm,mlx-lm-4bit,ar,orthrus", "--json", str(out)]
    assert main(args + (["--plot", str(png)] if plot else [])) == 0

    report = json.loads(out.read_text())
    summary = report["summary"]
    assert list(summary) == ["mlx-lm", "mlx-lm-4bit", "ar", "orthrus-2", "orthrus-4"]
    # 4-bit weights are other weights: their tokens are not held to mlx-lm's float ones, and they
    # take less memory.
    assert summary.pop("mlx-lm-4bit")["mismatched_prompts"] is None
    for mode, s in summary.items():
        assert s["mismatched_prompts"] == [], mode
        assert s["tokens_per_sec"] > 0 and s["ratio_to_mlx_lm"] > 0
        assert s["step_cost_vs_ar_token"] > 0 and s["peak_memory_gb"] > 0
        assert sum(s["histogram"].values()) == s["steps"]
    assert summary["mlx-lm"]["ratio_to_mlx_lm"] == 1.0
    assert summary["ar"]["step_cost_vs_ar_token"] == 1.0
    assert len(report["prompts"]) == 2
    for row in report["prompts"]:
        assert set(row["modes"]) == set(summary) | {"mlx-lm-4bit"}
        assert len({m["generated_tokens"] for m in row["modes"].values()}) == 1
    machine = report["machine"]
    assert ("Linux CPU" in machine and "MLX CPU backend" in machine) or "macOS" in machine
    printed = capsys.readouterr().out
    assert "| mode | tok/s | vs mlx-lm |" in printed and "orthrus-4" in printed
    if plot:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_block_sizes_and_modes_flags():
    assert parse_block_sizes(None, 32) == [2, 4, 8, 16, 32]
    assert parse_block_sizes(None, 12) == [2, 4, 8, 12]
    assert parse_block_sizes("16,4,8", 32) == [4, 8, 16]
    assert parse_modes("orthrus,mlx-lm", [4, 8], True) == ["mlx-lm", "orthrus-4", "orthrus-8"]
    assert parse_modes("mlx-lm,ar,orthrus,auto", [4], False) == ["mlx-lm", "ar"]
    for bad in ("1,4", "x"):
        with pytest.raises(ValueError):
            parse_block_sizes(bad, 32)
    with pytest.raises(ValueError):
        parse_modes("fast", [4], True)


def test_bad_flags_exit_1_with_one_line(model_path, capsys):
    assert main(["bench", "--model", str(model_path), "--modes", "turbo"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--modes" in err


def test_plot_without_matplotlib_fails_before_any_run(model_path, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # what an install without it looks like
    runs = []
    monkeypatch.setattr(bench, "run_once", lambda *a: runs.append(a))
    args = ["bench", "--model", str(model_path), "--num-prompts", "1", "--max-tokens", "8",
            "--repeats", "1", "--plot", str(tmp_path / "bench.png")]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--plot needs matplotlib" in err
    assert runs == [] and not (tmp_path / "bench.png").exists()


def test_random_diffusion_gives_useless_drafts_and_the_same_tokens(model_path, tmp_path, monkeypatch):
    monkeypatch.setenv("ORTHRUS_MLX_CACHE", str(tmp_path))  # auto's step-cost calibration
    out = tmp_path / "bench.json"
    args = ["bench", "--model", str(model_path), "--num-prompts", "1", "--max-tokens", "8",
            "--repeats", "1", "--modes", "mlx-lm,ar,orthrus,auto", "--block-sizes", "4",
            "--random-diffusion", "--json", str(out)]
    assert main(args) == 0
    report = json.loads(out.read_text())
    assert report["settings"]["random_diffusion"] is True
    summary = report["summary"]
    assert set(summary) == {"mlx-lm", "ar", "orthrus-4", "auto"}
    assert all(s["mismatched_prompts"] == [] for s in summary.values())
