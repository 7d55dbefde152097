"""Fixtures several unit test modules share."""

import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """The sandbox's tiny model, built once per test session by make-tiny-model."""
    out = tmp_path_factory.mktemp("tiny-model")
    subprocess.run([sys.executable, "-m", "harness.make_tiny_model", "--out", str(out)], cwd=REPO,
                   check=True, capture_output=True)
    return out


@pytest.fixture
def controller_folders(tmp_path) -> dict[str, str]:
    """Small real stand-ins for the controller folders the data names (a model with its
    config.json, a wheelhouse with its lock), as data overrides."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    wheelhouse = tmp_path / "wheelhouse"
    wheelhouse.mkdir()
    (wheelhouse / "requirements.lock").write_text("# pins\n")
    return {"model_source_dir": str(model), "vllm_wheelhouse_dir": str(wheelhouse)}
