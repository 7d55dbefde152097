"""The weights a last good release served, kept as hard links beside their folder and put
back when a new release fails its health wait (tasks/vllm_service.py). The shell the deploy
runs on a tray runs here for real, with cp, mv and ln, on folders under tmp_path; only the
Hub fetch's state folder, under /var/lib on a tray, is moved under tmp_path too."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tasks import vllm_service
from tasks.vllm_service import (RELEASE_WEIGHTS, last_good_copy, weights_kept_script,
                                weights_restored_script)


@pytest.fixture
def tray(tmp_path, monkeypatch):
    """A weights folder as a Hub fetch leaves it (shards, the downloader's records, the
    fetch's state folder elsewhere), and a release folder that lists it."""
    model = tmp_path / "models" / "tiny-kimi"
    (model / ".cache" / "huggingface").mkdir(parents=True)
    (model / "config.json").write_text('{"good": true}')
    (model / "model.safetensors").write_bytes(b"good weights")
    (model / ".cache" / "huggingface" / "shard.metadata").write_text("good revision")
    state = tmp_path / "state" / "tiny-kimi"
    state.mkdir(parents=True)
    (state / "job.json").write_text("good listing")
    monkeypatch.setattr(vllm_service, "state_dir_of", lambda folder: str(state))
    release = tmp_path / "release"
    release.mkdir()
    (release / RELEASE_WEIGHTS).write_text(f"{model}\n")
    return {"model": model, "state": state, "release": release}


def run(script: str) -> subprocess.CompletedProcess:
    return subprocess.run(["sh", "-c", script], capture_output=True, text=True, check=True)


def replaced(path: Path, content: str) -> None:
    """As the Hub client and tree_synced write a file: beside it, renamed into place."""
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(content)
    partial.rename(path)


def test_kept_weights_share_the_files_and_copy_what_is_written_in_place(tray):
    model = tray["model"]
    run(weights_kept_script([str(model)]))
    kept = Path(last_good_copy(str(model)))
    assert kept == model.parent / ".tiny-kimi.last-good"
    assert (kept / "tree" / "model.safetensors").stat().st_ino == \
        (model / "model.safetensors").stat().st_ino, "a copy, not a link: disk spent twice"
    records = Path(".cache/huggingface/shard.metadata")
    assert (kept / "tree" / records).stat().st_ino != (model / records).stat().st_ino
    assert (kept / "state" / "job.json").read_text() == "good listing"
    assert oct(kept.stat().st_mode & 0o777) == "0o700"


def test_a_failed_release_gets_the_kept_weights_and_state_back(tray):
    model, state = tray["model"], tray["state"]
    run(weights_kept_script([str(model)]))
    # The new release: a shard and the records replaced, a file added, new fetch state.
    replaced(model / "model.safetensors", "version https://git-lfs.github.com/spec/v1\n")
    (model / ".cache" / "huggingface" / "shard.metadata").write_text("bad revision")
    (model / "extra.bin").write_text("extra")
    (state / "job.json").write_text("bad listing")
    result = run(weights_restored_script([str(model)], "tray-01", str(tray["release"])))
    assert f"tray-01: weights {model} put back" in result.stderr
    assert (model / "model.safetensors").read_bytes() == b"good weights"
    assert (model / ".cache" / "huggingface" / "shard.metadata").read_text() == "good revision"
    assert not (model / "extra.bin").exists()
    assert (state / "job.json").read_text() == "good listing"
    assert sorted(os.listdir(model.parent)) == [".tiny-kimi.last-good", "tiny-kimi"]
    # What the restore put back is again links to the kept copy, which stays whole.
    kept = Path(last_good_copy(str(model)))
    assert (kept / "tree" / "model.safetensors").stat().st_ino == \
        (model / "model.safetensors").stat().st_ino
    assert (kept / "tree" / ".cache/huggingface/shard.metadata").read_text() == "good revision"


def test_a_folder_the_kept_release_did_not_serve_is_left_alone(tray):
    """A release kept before this code (no weights list), or one that served another
    folder (weights_dir moved since): the new release's folder stays as it is."""
    model = tray["model"]
    run(weights_kept_script([str(model)]))
    replaced(model / "model.safetensors", "new weights")
    (tray["release"] / RELEASE_WEIGHTS).write_text("/raid/models/other\n")
    result = run(weights_restored_script([str(model)], "tray-01", str(tray["release"])))
    assert result.stderr == ""
    assert (model / "model.safetensors").read_text() == "new weights"


def test_a_folder_that_cannot_be_linked_is_kept_without_and_says_so(tray):
    """cp -al fails (here: an unreadable source stands in for another filesystem); the keep
    goes on without that folder's copy, leaves nothing half made, and warns."""
    missing = str(tray["model"].parent / "absent")
    result = run(weights_kept_script([missing]) + " && echo kept-the-rest")
    assert "could not be kept as hard links" in result.stderr
    assert result.stdout.strip() == "kept-the-rest"
    assert not Path(f"{last_good_copy(missing)}.new").exists()
    assert not Path(last_good_copy(missing)).exists()
