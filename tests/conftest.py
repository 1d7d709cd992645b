import sys
from pathlib import Path

import pytest

# Lets tests import the shared helpers (tests/reference.py, tests/cli_helpers.py).
sys.path.insert(0, str(Path(__file__).parent))

from cli_helpers import checkpoint  # noqa: E402

from orthrus_mlx import load  # noqa: E402


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    """The checkpoint the command tests run: the shipped one, else a random one."""
    return checkpoint(tmp_path_factory)


@pytest.fixture(scope="module")
def loaded(model_path):
    return load(model_path)
