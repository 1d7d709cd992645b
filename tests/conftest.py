import sys
from pathlib import Path

import pytest

# Lets tests import the shared helpers (tests/reference.py, tests/cli_helpers.py).
sys.path.insert(0, str(Path(__file__).parent))

from cli_helpers import checkpoint  # noqa: E402
from orthrus_mlx import load  # noqa: E402

# Where anything of ours (step costs, matplotlib's font cache, a hub download) would land by
# default. Tests point them at temporary folders; subprocesses inherit them through os.environ.
HOME_VARIABLES = ("HOME", "XDG_CACHE_HOME", "XDG_CONFIG_HOME", "ORTHRUS_MLX_CACHE")


def private_home(monkeypatch: pytest.MonkeyPatch, root: Path) -> None:
    for name in HOME_VARIABLES:
        monkeypatch.setenv(name, str(root / name.lower()))


@pytest.fixture(scope="session", autouse=True)
def session_home(tmp_path_factory):
    """Covers module-scoped fixtures too (a server process started once per module)."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        private_home(monkeypatch, tmp_path_factory.mktemp("session-home"))
        yield


@pytest.fixture(autouse=True)
def test_home(tmp_path_factory, monkeypatch):
    """Each test starts from empty folders: nothing one test writes is read by the next."""
    private_home(monkeypatch, tmp_path_factory.mktemp("home"))


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    """The checkpoint the command tests run: the shipped one, else a random one."""
    return checkpoint(tmp_path_factory)


@pytest.fixture(scope="module")
def loaded(model_path):
    return load(model_path)
