"""Fixtures several unit test modules share."""

import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """The sandbox's tiny model, built once per test session by tools/make-tiny-model."""
    out = tmp_path_factory.mktemp("tiny-model")
    subprocess.run([sys.executable, str(REPO / "tools" / "make-tiny-model"), "--out", str(out)],
                   check=True, capture_output=True)
    return out
