"""tasks/weights*.py and files/weights-fetch.py: the Hub listing from the controller
(weights_hub), the completeness rule and the space check (weights_host), the job's schema
(weights_job), and the host-side fetch run here against tools/hub-mirror on loopback with the
real `hf` CLI (the same script the sandbox hosts run under systemd)."""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import http.server
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from pyinfra.api import Config, FileUploadCommand, FunctionCommand, Inventory, State
from pyinfra.api.connect import connect_all
from pyinfra.api.deploy import add_deploy
from pyinfra.api.util import get_template
from pyinfra.context import ctx_host, ctx_state
from pyinfra.facts.files import File, FindFiles

from tasks import facts, operations, weights, weights_host, weights_hub, weights_job
from tasks.facts import TreeDigests
from tasks.settings import DataError, read_settings
from tests.helpers import REPO, fact_command, group_data, planned_commands
from tests.unit.test_hub_mirror import CLIENT_PIECE, Mirror, digests

HF = REPO / ".venv" / "bin" / "hf"
REPO_ID = "test-org/tiny-kimi"
SANDBOX_REPO = "sandbox/tiny-kimi"  # model_profile sandbox-tiny's
BIG_REPO = "test-org/big"
SHARD = "model-00001-of-00002.safetensors"


@pytest.fixture(scope="module")
def big_model(tmp_path_factory) -> Path:
    """Three shards of 3 client pieces each, random so a wrong byte changes the checksum."""
    out = tmp_path_factory.mktemp("big-model")
    for index in range(3):
        (out / f"model-0000{index + 1}-of-00003.safetensors").write_bytes(
            os.urandom(3 * CLIENT_PIECE))
    (out / "config.json").write_text('{"model_type": "test"}\n')
    return out


@pytest.fixture(scope="module")
def module_mirror(tmp_path_factory, tiny_model, big_model):
    mirror = Mirror(tmp_path_factory.mktemp("mirror"), {REPO_ID: tiny_model, BIG_REPO: big_model,
                                                        SANDBOX_REPO: tiny_model},
                    token="hf_unit_test_token_0123456789")
    yield mirror
    mirror.stop()


@pytest.fixture
def mirror(module_mirror):
    return module_mirror.reset()


def hub_settings(**overrides) -> weights_hub.HubSettings:
    values = dict(endpoint=None, token=None, include=(), exclude=(), max_workers=4, xet=True,
                  stall_timeout_s=30, attempts=3, verify_full=False, verify_schedule="weekly",
                  draft_revision="main", peer_copy=False, peer_port=8790, peer_address=None)
    values.update(overrides)
    return weights_hub.HubSettings(**values)


def job(mirror, tmp_path, repo=REPO_ID, **overrides) -> Path:
    listing = weights_hub.hub_listing(repo, "main", mirror.url, mirror.token)
    target = weights.Target("model", repo, "main", str(tmp_path / "out"))
    token_file = tmp_path / "token"
    token_file.write_text(mirror.token)
    token_file.chmod(0o600)
    body = weights.job_for(target, listing, hub_settings(endpoint=mirror.url,
                                                         token=mirror.token),
                           str(HF.parent / "python3"))
    body = dataclasses.replace(body, state_dir=str(tmp_path / "state"),
                               token_file=str(token_file), **overrides)
    path = tmp_path / weights_job.JOB_FILE
    path.write_bytes(body.to_json())
    return path


def fetch(job_path: Path, *args, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(weights.FETCH_SCRIPT), "--job", str(job_path),
                           *args], capture_output=True, text=True, timeout=timeout,
                          env={"PATH": os.environ["PATH"], "HOME": str(job_path.parent)})


def status(tmp_path) -> dict:
    return json.loads((tmp_path / "state" / weights_job.STATUS_FILE).read_text())


def tree_of(folder: Path) -> dict:
    """What the WeightsTree fact reports, computed here with the same rules."""
    present = {}
    for path in folder.rglob("*"):
        relative = path.relative_to(folder).as_posix()
        if path.is_file() and not relative.startswith(f"{weights_job.RECORDS_DIR}/"):
            stat = path.stat()
            present[relative] = [stat.st_size, stat.st_mtime_ns]
    try:
        manifest = json.loads((folder / weights_job.MANIFEST).read_text())
    except OSError:
        manifest = None
    return {"manifest": manifest, "files": present, "incomplete_bytes": 0, "unit_active": False,
            "job_sha256": None}


# ---- data keys -----------------------------------------------------------------------------

def test_defaults_pass_and_read_the_token_from_the_environment():
    hub = weights_hub.read_hub_settings("h1", group_data(), environ={"HF_TOKEN": " hf_abc \n"})
    assert hub.token == "hf_abc" and hub.endpoint is None and hub.xet and hub.attempts == 4


@pytest.mark.parametrize("key, value", [
    ("weights_hf_endpoint", "mirror.example:8080"), ("weights_max_workers", 0),
    ("weights_xet", "yes"), ("weights_stall_timeout_s", 5), ("weights_download_attempts", True),
    ("weights_include", "*.safetensors"), ("model_draft_revision", ""),
    ("weights_hf_token_file", "/nonexistent/token")])
def test_bad_values_name_host_and_key(key, value):
    with pytest.raises(DataError) as error:
        weights_hub.read_hub_settings("h1", {**group_data(), key: value}, environ={})
    assert f"h1: {key}: found {value!r}; need " in str(error.value)


@pytest.mark.parametrize("key, low, high, need", [
    ("weights_max_workers", 1, 64, "an integer 1..64"),
    ("weights_stall_timeout_s", 30, 86400, "seconds, 30..86400"),
    ("weights_download_attempts", 1, 20, "an integer 1..20")])
def test_numeric_keys_have_a_range_that_the_error_states(key, low, high, need):
    for good in (low, high):
        weights_hub.read_hub_settings("h1", {**group_data(), key: good}, environ={})
    for bad in (low - 1, high + 1, float(low), str(low)):
        with pytest.raises(DataError) as error:
            weights_hub.read_hub_settings("h1", {**group_data(), key: bad}, environ={})
        assert f"h1: {key}: found {bad!r}; need {need}" in str(error.value)


def test_a_token_file_inside_the_repository_is_refused():
    with pytest.raises(DataError, match="outside this repository"):
        weights_hub.read_hub_settings("h1", {**group_data(),
                                             "weights_hf_token_file": "README.md"}, environ={})


# ---- the listing and the rules -------------------------------------------------------------

def test_listing_has_the_commit_sizes_and_checksums(mirror, tiny_model):
    listing = weights_hub.hub_listing(REPO_ID, "main", mirror.url, mirror.token)
    assert set(listing.files) == {p.name for p in tiny_model.iterdir()}
    shard = listing.files[SHARD]
    assert shard["sha256"] == hashlib.sha256((tiny_model / SHARD).read_bytes()).hexdigest()
    config = (tiny_model / "config.json").read_bytes()
    assert listing.files["config.json"]["git_sha1"] == hashlib.sha1(
        b"blob %d\0" % len(config) + config).hexdigest()
    filtered = weights_hub.hub_listing(REPO_ID, "main", mirror.url, mirror.token,
                                       include=("*.json",), exclude=("tokenizer*",))
    assert set(filtered.files) == {"config.json", "generation_config.json",
                                   "model.safetensors.index.json"}


@pytest.mark.parametrize("repo, revision, token, message", [
    (REPO_ID, "0" * 40, "ok", "revision '0000000000000000000000000000000000000000' not found"),
    ("test-org/nope", "main", "ok", "repo test-org/nope not found"),
    (REPO_ID, "main", None, f"repo {REPO_ID} not found"),
])
def test_lookup_errors_are_one_clear_line(mirror, repo, revision, token, message):
    with pytest.raises(weights_hub.HubLookupError) as error:
        weights_hub.hub_listing(repo, revision, mirror.url, mirror.token if token else None)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_the_listing_asks_the_configured_endpoint_and_nothing_else(mirror, tiny_model,
                                                                   tmp_path):
    # A fresh interpreter, as a pyinfra run is: huggingface_hub reads its settings at import.
    # A second mirror stands in for the default Hub (HF_ENDPOINT), with no cached agent list
    # (HF_HOME empty), which the client's telemetry would fetch from there.
    default_hub = Mirror(tmp_path / "default-hub", {REPO_ID: tiny_model})
    try:
        # The token in the environment, as ever: never on a command line.
        code = ("import os, sys; from tasks import weights_hub; print(weights_hub.hub_listing("
                "*sys.argv[1:], os.environ['MIRROR_TOKEN']).commit)")
        result = subprocess.run(
            [sys.executable, "-c", code, REPO_ID, "main", mirror.url],
            cwd=REPO, capture_output=True, text=True, timeout=60,
            env={**os.environ, "HF_ENDPOINT": default_hub.url, "HF_HOME": str(tmp_path / "hf"),
                 "MIRROR_TOKEN": mirror.token})
        assert result.returncode == 0, result.stderr
        assert default_hub.stats()["requests"] == []
        asked = [entry["path"] for entry in mirror.stats()["requests"]
                 if not entry["path"].startswith("/_mirror/")]  # the fixture's own reset
        assert asked == [f"/api/models/{REPO_ID}/revision/main?blobs=true"], asked
    finally:
        default_hub.stop()


def test_unreachable_endpoint_is_one_clear_line():
    with pytest.raises(weights_hub.HubLookupError, match="cannot reach http://127.0.0.1:9"):
        weights_hub.hub_listing(REPO_ID, "main", "http://127.0.0.1:9", None)


def test_space_problem_names_host_path_needed_and_free():
    listing = weights_hub.Listing("o/m", "main", "a" * 40, {
        "a.safetensors": {"size": 6 * 10**9, "sha256": "x", "git_sha1": "y"},
        "b.safetensors": {"size": 4 * 10**9, "sha256": "z", "git_sha1": "w"}})
    tree = {"manifest": None, "files": {"a.safetensors": [6 * 10**9, 1]}, "incomplete_bytes": 10**9}
    free = {"mount": "/raid", "free_bytes": 2 * 10**9}
    assert weights_host.bytes_to_fetch(listing, tree) == 4 * 10**9
    problem = weights_host.space_problem("h1", "/raid/models/m", listing, tree, free)
    assert problem == ("h1: weights_dir: /raid/models/m (filesystem /raid) needs 4.00 GB more "
                       "for o/m@aaaaaaaaaaaa, 3.00 GB free (4000000000 > 3000000000 bytes)")
    assert weights_host.space_problem("h1", "/raid/models/m", listing, tree,
                                      {**free, "free_bytes": 3 * 10**9}) is None


# ---- the job: one schema, and the script knows only what the job says --------------------

def test_the_weights_folder_records_are_the_ones_the_deploy_never_counts():
    assert operations.DOWNLOADER_RECORDS == f"{weights_job.RECORDS_DIR}/"
    for name in (weights_job.MANIFEST, weights_job.CLIENT_RECORDS_DIR):
        assert operations.undeclared_files([name + "/x"], declared=()) == []


def test_the_script_declares_no_path_of_its_own():
    script = weights.FETCH_SCRIPT.read_text()
    names = dataclasses.asdict(weights_job.Paths()).values()
    assert [name for name in names if f'"{name}"' in script or f"'{name}'" in script] == []
    assert "paths" in json.loads(weights.job_for(
        weights.Target("model", "o/m", "main", "/raid/m"),
        weights_hub.Listing("o/m", "main", "c" * 40, {}), hub_settings(), "/hf/bin/python3",
    ).to_json())


def test_the_script_reads_and_writes_only_where_the_job_says(tmp_path):
    """Every name in the job's paths moved: the script follows them, and a file under the
    moved records folder is a record, not an extra file."""
    out, state = tmp_path / "out", tmp_path / "state"
    out.mkdir()
    (out / "config.json").write_text("{}")
    paths = weights_job.Paths(manifest="records/m.json", records_dir="records",
                              client_records_dir="records/client", incomplete_glob="*.part",
                              status_file="report.json", lock_file="busy", hf_home="home",
                              no_token_file="none")
    job = weights_job.Job(
        repo="o/m", commit="c" * 40, local_dir=str(out), state_dir=str(state),
        unit="weights-fetch-m.service", endpoint=None, include=[], exclude=[], max_workers=1,
        xet=False, stall_timeout_s=30, attempts=1, token_file=None, hf="/nonexistent/hf",
        files={"config.json": {"size": 2, "sha256": None,
                               "git_sha1": hashlib.sha1(b"blob 2\0{}").hexdigest()},
               "model.safetensors": {"size": 5, "sha256": "0" * 64, "git_sha1": "1" * 40}},
        paths=dataclasses.asdict(paths))
    (out / "records" / "client").mkdir(parents=True)
    (out / "records" / "client" / "model.safetensors.part").write_bytes(b"xx")
    job_path = tmp_path / "job.json"
    job_path.write_bytes(job.to_json())
    result = fetch(job_path, "--verify")
    assert result.returncode == 1, result.stderr
    report = json.loads((state / "report.json").read_text())
    assert (report["missing"], report["corrupt"], report["extra"]) == (
        ["model.safetensors"], [], [])
    manifest = json.loads((out / "records" / "m.json").read_text())
    assert set(manifest["files"]) == {"config.json"} and not manifest["complete"]
    assert (state / "busy").exists()
    assert not (out / ".cache").exists() and not (state / "status.json").exists()


# ---- the host-side fetch, with the real client --------------------------------------------

def test_fresh_fetch_verifies_writes_a_manifest_and_a_rerun_is_complete(mirror, tiny_model,
                                                                       tmp_path):
    result = fetch(job(mirror, tmp_path))
    assert result.returncode == 0, result.stderr
    out = tmp_path / "out"
    assert {k: v for k, v in digests(out).items()} == digests(tiny_model)
    assert status(tmp_path)["state"] == "done"
    listing = weights_hub.hub_listing(REPO_ID, "main", mirror.url, mirror.token)
    started = time.monotonic()
    assert weights_host.is_complete(listing, tree_of(out))
    assert time.monotonic() - started < 1
    # The token travelled in a file: never in the client's argv or the logs.
    assert mirror.token not in result.stderr + result.stdout


def test_a_corrupt_shard_is_detected_and_fetched_again(mirror, tiny_model, tmp_path):
    assert fetch(job(mirror, tmp_path)).returncode == 0
    out = tmp_path / "out"
    shard = out / SHARD
    with open(shard, "r+b") as handle:
        handle.seek(100)
        handle.write(b"\xff" * 16)
    listing = weights_hub.hub_listing(REPO_ID, "main", mirror.url, mirror.token)
    assert not weights_host.is_complete(listing, tree_of(out))
    mirror.call("POST", "/_mirror/stats/reset")
    result = fetch(job(mirror, tmp_path))
    assert result.returncode == 0, result.stderr
    assert digests(out) == digests(tiny_model)
    assert set(mirror.stats()["bytes_sent"]) == {f"{REPO_ID}/{SHARD}"}
    assert weights_host.is_complete(listing, tree_of(out))


def test_a_folder_the_push_path_filled_is_complete_after_one_hub_fetch(mirror, tiny_model,
                                                                       tmp_path):
    """The known re-fetch bug: the push path (model_source_dir) leaves the files and no client
    metadata. The first Hub fetch hashed them, then the client wrote the small non-LFS ones
    again (without its metadata it cannot vouch for them), so the manifest kept the mtimes of
    the files it replaced: the next deploy saw changed files, fetched again and restarted vLLM
    once more. The manifest must describe the files as the fetch leaves them."""
    out = tmp_path / "out"
    out.mkdir()
    for source in tiny_model.iterdir():
        (out / source.name).write_bytes(source.read_bytes())
        os.utime(out / source.name, ns=(10**18, 10**18))  # as pushed, long ago
    assert fetch(job(mirror, tmp_path)).returncode == 0
    listing = weights_hub.hub_listing(REPO_ID, "main", mirror.url, mirror.token)
    assert weights_host.is_complete(listing, tree_of(out))
    mirror.call("POST", "/_mirror/stats/reset")
    assert fetch(job(mirror, tmp_path)).returncode == 0
    assert mirror.stats()["bytes_sent"] == {}


def test_a_truncated_shard_is_fetched_again(mirror, tiny_model, tmp_path):
    assert fetch(job(mirror, tmp_path)).returncode == 0
    shard = tmp_path / "out" / SHARD
    os.truncate(shard, shard.stat().st_size // 2)
    assert fetch(job(mirror, tmp_path)).returncode == 0
    assert digests(tmp_path / "out") == digests(tiny_model)


def test_verify_names_missing_corrupt_and_extra_files(mirror, tiny_model, tmp_path):
    assert fetch(job(mirror, tmp_path)).returncode == 0
    out = tmp_path / "out"
    (out / "tokenizer.json").unlink()
    config = out / "config.json"
    stat = config.stat()
    config.write_text(config.read_text().replace("{", "{ ", 1)[: stat.st_size])
    os.utime(config, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # a silent change: same mtime
    (out / "notes.txt").write_text("mine")
    result = fetch(job(mirror, tmp_path), "--verify")
    assert result.returncode == 1
    report = status(tmp_path)
    assert (report["missing"], report["corrupt"], report["extra"]) == (
        ["tokenizer.json"], ["config.json"], ["notes.txt"])
    assert not config.exists()  # deleted, so the next fetch replaces it
    assert (out / "notes.txt").exists()  # --verify reports, the fetch removes
    result = fetch(job(mirror, tmp_path))
    assert result.returncode == 0, result.stderr
    assert digests(out) == digests(tiny_model)
    assert "removing notes.txt: not in test-org/tiny-kimi@" in result.stderr


def silently_corrupted(path: Path) -> None:
    """Bit rot, or a bad copy: other bytes, the same size and mtime."""
    stat = path.stat()
    with open(path, "r+b") as handle:
        handle.seek(stat.st_size // 2)
        byte = handle.read(1)
        handle.seek(-1, os.SEEK_CUR)
        handle.write(bytes([byte[0] ^ 0xFF]))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_bit_rot_escapes_a_fetch_and_the_audit_finds_it_keeps_it_and_hands_it_on(
        mirror, tiny_model, tmp_path):
    """The scheduled deep verify (--audit): a fetch trusts sizes and mtimes (that is how a
    595 GB tree is recognised in a second), so only re-hashing finds a silent change. The
    audit deletes nothing (vLLM may be serving the folder), drops the file from the manifest,
    and the next fetch replaces that file alone."""
    job_path = job(mirror, tmp_path)
    assert fetch(job_path).returncode == 0
    out, audit_file = tmp_path / "out", tmp_path / "state" / weights_job.AUDIT_FILE
    silently_corrupted(out / SHARD)
    listing = weights_hub.hub_listing(REPO_ID, "main", mirror.url, mirror.token)
    assert weights_host.is_complete(listing, tree_of(out))  # what a deploy reads: unnoticed
    fetch_status = status(tmp_path)
    result = fetch(job_path, "--audit", str(audit_file))
    assert result.returncode == 1, result.stderr
    report = json.loads(audit_file.read_text())
    assert (report["state"], report["corrupt"], report["missing"]) == ("failed", [SHARD], [])
    assert report["finished"] > 0 and f"corrupt: {SHARD}" in result.stderr
    assert (out / SHARD).exists() and digests(out) != digests(tiny_model)  # kept
    assert status(tmp_path) == fetch_status  # the fetch's report: untouched
    manifest = json.loads((out / weights_job.MANIFEST).read_text())
    assert SHARD not in manifest["files"] and not manifest["complete"]
    assert not weights_host.is_complete(listing, tree_of(out))  # now the deploy fetches it
    mirror.call("POST", "/_mirror/stats/reset")
    assert fetch(job_path).returncode == 0
    assert digests(out) == digests(tiny_model)
    assert set(mirror.stats()["bytes_sent"]) == {f"{REPO_ID}/{SHARD}"}
    assert fetch(job_path, "--audit", str(audit_file)).returncode == 0
    assert json.loads(audit_file.read_text())["state"] == "done"


def test_the_audit_skips_a_folder_a_fetch_holds(mirror, tmp_path):
    job_path = job(mirror, tmp_path)
    state = tmp_path / "state"
    state.mkdir()
    with open(state / weights_job.LOCK_FILE, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        result = fetch(job_path, "--audit", str(state / weights_job.AUDIT_FILE))
    assert result.returncode == 75 and "this scheduled verify is skipped" in result.stderr
    assert not (state / weights_job.AUDIT_FILE).exists()


def test_dropped_connection_mid_shard_still_gives_the_right_bytes(mirror, big_model, tmp_path):
    shard = "model-00002-of-00003.safetensors"
    mirror.add_fault(path=f"{BIG_REPO}/{shard}", reset_after_bytes=CLIENT_PIECE + 12345, times=1)
    result = fetch(job(mirror, tmp_path, repo=BIG_REPO))
    assert result.returncode == 0, result.stderr
    assert digests(tmp_path / "out") == digests(big_model)


def test_a_stall_is_stopped_and_retried_with_xet_off(mirror, big_model, tmp_path):
    shard = "model-00001-of-00003.safetensors"
    # The watchdog (4 s) fires before the client's own read timeout (10 s) would.
    mirror.add_fault(path=f"{BIG_REPO}/{shard}", stall_after_bytes=CLIENT_PIECE + 1,
                     stall_seconds=60, times=1)
    job_path = job(mirror, tmp_path, repo=BIG_REPO, stall_timeout_s=4)
    result = fetch(job_path)
    assert result.returncode == 0, result.stderr
    assert "no progress for 4 s" in result.stderr and "(Xet off)" in result.stderr
    assert digests(tmp_path / "out") == digests(big_model)
    assert not list((tmp_path / "out").rglob("*.incomplete"))


def test_attempts_are_bounded_and_the_failure_says_why(mirror, big_model, tmp_path):
    shard = "model-00003-of-00003.safetensors"
    mirror.add_fault(path=f"{BIG_REPO}/{shard}", reset_after_bytes=10, times=50)
    result = fetch(job(mirror, tmp_path, repo=BIG_REPO, attempts=2))
    assert result.returncode == 1
    report = status(tmp_path)
    assert report["state"] == "failed"
    assert "incomplete after 2 attempts" in report["message"]
    assert report["missing"] == [shard]


def test_killed_fetch_leaves_an_orphan_that_the_rerun_removes(mirror, big_model, tmp_path):
    shard = "model-00001-of-00003.safetensors"
    mirror.add_fault(path=f"{BIG_REPO}/{shard}", stall_after_bytes=CLIENT_PIECE + 1,
                     stall_seconds=30, times=1)
    job_path = job(mirror, tmp_path, repo=BIG_REPO)
    process = subprocess.Popen([sys.executable, str(weights.FETCH_SCRIPT), "--job", str(job_path)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    out = tmp_path / "out"
    deadline = time.monotonic() + 30
    while not list(out.rglob("*.incomplete")) or sum(
            p.stat().st_size for p in out.rglob("*.incomplete")) < CLIENT_PIECE:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGKILL)  # no cleanup at all: the worst case
    process.wait()
    assert list(out.rglob("*.incomplete"))
    done = {p.name for p in out.glob("*.safetensors")}
    mirror.call("POST", "/_mirror/stats/reset")
    mirror.call("DELETE", "/_mirror/faults")
    assert fetch(job_path).returncode == 0
    assert digests(out) == digests(big_model)
    assert not list(out.rglob("*.incomplete"))
    assert not done & {key.split("/")[-1] for key in mirror.stats()["bytes_sent"]}


# ---- fetched once per fleet: peers ----------------------------------------------------------

class Peer:
    """weights-fetch.py --serve on loopback, over the folders of the given jobs."""

    def __init__(self, *job_paths: Path):
        command = [sys.executable, str(weights.FETCH_SCRIPT), "--serve", "127.0.0.1:0"]
        for job_path in job_paths:
            command += ["--job", str(job_path)]
        self.process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
        line = self.process.stderr.readline()
        assert "serving verified weights" in line, line
        self.url = "http://" + line.rsplit(" on ", 1)[1].strip()

    def stop(self) -> str:
        self.process.terminate()
        return self.process.communicate(timeout=10)[1]


def sent_by_mirror(mirror) -> int:
    return sum(mirror.stats()["bytes_sent"].values())


def seeded(mirror, tmp_path, repo=BIG_REPO) -> Path:
    """A host that fetched ``repo`` from the mirror: its job."""
    (tmp_path / "seed").mkdir()
    seed_job = job(mirror, tmp_path / "seed", repo=repo)
    assert fetch(seed_job).returncode == 0
    return seed_job


def test_a_fleet_fetches_from_the_hub_once_and_copies_the_rest_from_peers(mirror, big_model,
                                                                        tmp_path):
    """The seed still fetching (a stalled shard at the mirror) when the copies start: they wait
    for it, take each shard as the seed verifies it, and the last copies from the one before."""
    shard = "model-00002-of-00003.safetensors"
    mirror.add_fault(path=f"{BIG_REPO}/{shard}", stall_after_bytes=1, stall_seconds=3, times=1)
    for name in ("seed", "a", "b"):
        (tmp_path / name).mkdir()
    seed_job = job(mirror, tmp_path / "seed", repo=BIG_REPO)
    seed, a = Peer(seed_job), None
    try:
        a_job = job(mirror, tmp_path / "a", repo=BIG_REPO, peers=[seed.url])
        a = Peer(a_job)
        b_job = job(mirror, tmp_path / "b", repo=BIG_REPO, peers=[a.url, seed.url])
        runs = [subprocess.Popen([sys.executable, str(weights.FETCH_SCRIPT), "--job", str(path)],
                                 stderr=subprocess.PIPE, text=True)
                for path in (seed_job, a_job, b_job)]
        logs = [run.communicate(timeout=120)[1] for run in runs]
        assert [run.returncode for run in runs] == [0, 0, 0], logs
    finally:
        sent = {"seed": seed.stop(), "a": a.stop() if a else ""}
    for name in ("seed", "a", "b"):
        assert digests(tmp_path / name / "out") == digests(big_model)
        assert not list((tmp_path / name / "out").rglob("*.incomplete"))
    # The Hub (the mirror) sent the repository once: to the seed.
    total = sum(p.stat().st_size for p in big_model.iterdir())
    assert sent_by_mirror(mirror) == total
    assert "hf download" not in logs[1] + logs[2]
    # b copied from a, its first peer; a from the seed.
    assert sent["a"].count("sent ") == len(list(big_model.iterdir()))
    assert sent["seed"].count("sent ") == len(list(big_model.iterdir()))
    copier = weights_host.is_complete(
        weights_hub.hub_listing(BIG_REPO, "main", mirror.url, mirror.token),
        tree_of(tmp_path / "b" / "out"))
    assert copier


class DyingPeer(http.server.ThreadingHTTPServer):
    """Test double of a peer that dies in the middle of a file: the real server cannot be made
    to stop at a chosen byte. It offers every file of ``listing`` with the Hub's checksum and
    sends half of each before closing the connection."""

    def __init__(self, folder: Path, listing):
        files = {path: want.get("sha256") or want["git_sha1"]
                 for path, want in listing.files.items()}

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                if self.path.endswith("/offer"):
                    body = json.dumps({"files": files, "fetching": False,
                                       "bytes_done": 0}).encode()
                else:
                    data = (folder / self.path.split("/files/", 1)[1]).read_bytes()
                    body = data[:len(data) // 2]
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(body)
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        threading.Thread(target=self.serve_forever, daemon=True).start()


def test_a_peer_with_a_bad_file_or_dying_mid_copy_is_left_and_the_hub_gets_the_rest(
        mirror, big_model, tmp_path):
    seed_job = seeded(mirror, tmp_path)
    rotten = "model-00003-of-00003.safetensors"
    silently_corrupted(tmp_path / "seed" / "out" / rotten)  # still in the seed's manifest
    listing = weights_hub.hub_listing(BIG_REPO, "main", mirror.url, mirror.token)
    seed, dying = Peer(seed_job), DyingPeer(big_model, listing)
    mirror.call("POST", "/_mirror/stats/reset")
    try:
        (tmp_path / "copy").mkdir()
        result = fetch(job(mirror, tmp_path / "copy", repo=BIG_REPO,
                           peers=[seed.url, dying.url]))
    finally:
        seed.stop()
        dying.shutdown()
    assert result.returncode == 0, result.stderr
    out = tmp_path / "copy" / "out"
    assert digests(out) == digests(big_model)
    assert not list(out.rglob("*.incomplete"))
    assert f"{rotten} from peer {seed.url}" in result.stderr
    assert f"peer {seed.url} failed a copy; next: peer {dying.url}" in result.stderr
    assert f"peer {dying.url} failed a copy; the Hub fetches the rest" in result.stderr
    # Only the file no peer could give came from the Hub.
    assert mirror.stats()["bytes_sent"] == {f"{BIG_REPO}/{rotten}": 3 * CLIENT_PIECE}


def test_an_unreachable_peer_is_left_at_once_and_a_complete_one_gives_everything(
        mirror, big_model, tmp_path):
    seed_job = seeded(mirror, tmp_path)
    seed = Peer(seed_job)
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        nobody = f"http://127.0.0.1:{unused.getsockname()[1]}"
    mirror.call("POST", "/_mirror/stats/reset")
    try:
        (tmp_path / "copy").mkdir()
        started = time.monotonic()
        result = fetch(job(mirror, tmp_path / "copy", repo=BIG_REPO, peers=[nobody, seed.url]))
    finally:
        seed.stop()
    assert result.returncode == 0, result.stderr
    assert time.monotonic() - started < 20
    assert f"peer {nobody} left: unreachable" in result.stderr
    assert digests(tmp_path / "copy" / "out") == digests(big_model)
    assert sent_by_mirror(mirror) == 0


def test_the_peer_server_offers_only_verified_unchanged_files_of_the_commit_asked(
        mirror, big_model, tmp_path):
    seed_job = seeded(mirror, tmp_path)
    commit = json.loads(seed_job.read_text())["commit"]
    touched = tmp_path / "seed" / "out" / "config.json"
    touched.write_text(touched.read_text())  # same bytes, a new mtime: not verified since
    seed = Peer(seed_job)
    try:
        def get(path):
            try:
                with urllib.request.urlopen(seed.url + path, timeout=10) as response:
                    return response.status, response.read()
            except urllib.error.HTTPError as error:
                return error.code, error.read()

        code, body = get(f"/v1/{commit}/offer")
        assert code == 200
        offer = json.loads(body)
        assert set(offer["files"]) == {p.name for p in big_model.iterdir()} - {"config.json"}
        assert offer["fetching"] is False
        assert get(f"/v1/{commit}/files/config.json")[0] == 404
        assert get(f"/v1/{'0' * 40}/offer")[0] == 404
        shard = "model-00001-of-00003.safetensors"
        assert get(f"/v1/{commit}/files/{shard}") == (200, (big_model / shard).read_bytes())
        assert get(f"/v1/{commit}/files/../job.json")[0] == 404
    finally:
        log = seed.stop()
    assert f"sent {shard} ({3 * CLIENT_PIECE} bytes)" in log


@pytest.mark.parametrize("count, name, peers", [
    (1, "t0", []), (5, "t1", ["t0"]), (5, "t2", ["t0"]), (5, "t3", ["t1", "t0"]),
    (5, "t4", ["t1", "t0"]), (8, "t7", ["t3", "t1", "t0"]),
])
def test_peers_form_a_binary_tree_in_inventory_order(count, name, peers):
    hosts = [(f"t{i}", {"gb200"}, {"weights_peer_copy": True, "ssh_hostname": f"t{i}.rack"})
             for i in range(count)]
    # A router, and a tray that does not copy, take no place in the tree.
    hosts.insert(1, ("r0", {"router"}, {"weights_peer_copy": True}))
    hosts.insert(2, ("solo", {"gb200"}, {}))
    assert weights.peers_of(name, hosts) == [f"http://{p}.rack:8790" for p in peers]


def test_a_peer_url_is_its_address_key_else_its_ssh_address_else_its_name():
    assert weights.peer_url("@ssh/t1", {}) == "http://t1:8790"
    assert weights.peer_url("t1", {"ssh_hostname": "10.0.0.1"}) == "http://10.0.0.1:8790"
    assert weights.peer_url("t1", {"ssh_hostname": "10.0.0.1", "weights_peer_address":
                                   "192.168.7.1", "weights_peer_port": 9000}) == \
        "http://192.168.7.1:9000"


# ---- the deploy's plan on @fake: undeclared files, a token no longer needed -----------------

def describe(command) -> str:
    if isinstance(command, FileUploadCommand):
        return f"upload {command.dest}"
    if isinstance(command, FunctionCommand):
        return f"call {command.function.__name__}"
    return command.get_raw_value()


def plan_place(data: dict, answers: dict) -> tuple[dict, bool]:
    """({operation name: commands} that change something, whether vLLM would be restarted)
    when tasks.weights.place runs on a fake host answering ``answers``: @fake stands in for a
    host with a weights folder (none exists here); the Hub, when asked, is tools/hub-mirror
    on loopback."""
    inventory = Inventory(([("@fake/h1", {**data, "fake_responses": answers, "fake_delay": 0,
                                           "fake_delay_jitter": 0})], {}))
    state = State(inventory, Config())
    connect_all(state)
    restart = []
    add_deploy(state, lambda: restart.append(weights.ready(weights.place()).will_change))
    return planned_commands(state, inventory.get_host("@fake/h1"), describe), restart[0]


MODEL_DIR = "/raid/models/tiny-kimi"


def token_answer(present: bool) -> dict:
    line = ("user=root group=root mode=-rw------- atime=1 mtime=1 ctime=1 size=9 "
            f"'{weights_job.TOKEN_FILE}'")
    return {fact_command(File, path=weights_job.TOKEN_FILE): [line] if present else []}


def pushed_tree(source: Path, *extra: str) -> dict:
    """The TreeDigests answer of a host whose model folder holds the controller's copy of
    ``source`` and ``extra`` files, and the records a Hub fetch once left under .cache/."""
    lines = [f"{hashlib.sha256(path.read_bytes()).hexdigest()}  ./{path.name}"
             for path in sorted(source.iterdir())]
    lines += [f"{'0' * 64}  ./{name}" for name in (*extra, weights_job.MANIFEST)]
    return {fact_command(TreeDigests, path=MODEL_DIR): lines}


def push_data(controller_folders) -> dict:
    return {**group_data("sandbox"), **controller_folders, "weights_dir": "/raid/models",
            "vllm_host": "127.0.0.1"}


def test_the_push_path_removes_a_hub_token_left_by_the_hub_path(controller_folders):
    data = push_data(controller_folders)
    source = Path(data["model_source_dir"])
    plan, restart = plan_place(data, {**token_answer(True), **pushed_tree(source)})
    assert plan == {f"Remove Hub token {weights_job.TOKEN_FILE}": [f"rm -f {weights_job.TOKEN_FILE}"]}
    assert not restart  # vLLM never reads the token
    assert plan_place(data, {**token_answer(False), **pushed_tree(source)}) == ({}, False)


def test_the_push_path_removes_undeclared_files_and_restarts(controller_folders):
    data = push_data(controller_folders)
    plan, restart = plan_place(data, pushed_tree(Path(data["model_source_dir"]),
                                                 "notes.txt", "chat_template.jinja"))
    assert plan == {f"Place sandbox-tiny weights in {MODEL_DIR}": [
        f"rm -f -- {MODEL_DIR}/chat_template.jinja {MODEL_DIR}/notes.txt"]}
    assert restart


def hub_tree(listing: weights_hub.Listing, *extra: str) -> list[str]:
    """The WeightsTree answer of a complete, verified fetch of ``listing``, and ``extra``."""
    manifest = {"repo": listing.repo, "commit": listing.commit, "complete": True,
                "files": {path: {"size": want["size"], "mtime_ns": 10**9,
                                 "checksum": want["sha256"] or want["git_sha1"]}
                          for path, want in listing.files.items()}}
    files = [f"{path}\t{want['size']}\t1.0" for path, want in listing.files.items()]
    return ["::weights-tree::manifest", json.dumps(manifest), "::weights-tree::files", *files,
            *(f"{name}\t5\t1.0" for name in extra), "::weights-tree::incomplete",
            "::weights-tree::unit", "inactive", "::weights-tree::job"]


def hub_path(mirror, tmp_path, monkeypatch) -> tuple[dict, weights_hub.Listing, str]:
    """(the data of a host fetching the sandbox model from the mirror into MODEL_DIR, the
    listing, the command of its WeightsTree fact)."""
    monkeypatch.setenv("HF_TOKEN", mirror.token)
    wheelhouse = tmp_path / "hf-wheelhouse"
    wheelhouse.mkdir()
    (wheelhouse / "requirements.lock").write_text("# pins\nhuggingface-hub==2.4.0 \n")
    data = {**group_data(), "model_profile": "sandbox-tiny", "weights_dir": "/raid/models",
            "vllm_host": "127.0.0.1",
            "weights_hf_endpoint": mirror.url, "hf_cli_wheelhouse_dir": str(wheelhouse),
            "vllm_wheelhouse_dir": str(wheelhouse)}
    listing = weights_hub.hub_listing(SANDBOX_REPO, "main", mirror.url, mirror.token)
    target = weights.Target("model", SANDBOX_REPO, "main", MODEL_DIR)
    tree = fact_command(facts.WeightsTree, path=MODEL_DIR, state_dir=target.state_dir,
                        unit=target.unit)
    return data, listing, tree


def test_the_hub_path_removes_undeclared_files_from_a_complete_tree(mirror, tmp_path,
                                                                   monkeypatch):
    data, listing, tree = hub_path(mirror, tmp_path, monkeypatch)
    plan, restart = plan_place(data, {tree: hub_tree(listing, "notes.txt", "sub/stray.bin")})
    assert plan[f"Remove undeclared files from {MODEL_DIR}"] == [
        f"rm -f -- {MODEL_DIR}/notes.txt {MODEL_DIR}/sub/stray.bin"]
    assert not [name for name in plan if name.startswith("Fetch ")]
    assert restart
    plan, restart = plan_place(data, {tree: hub_tree(listing)})
    assert f"Remove undeclared files from {MODEL_DIR}" not in plan and not restart


def test_the_plan_reads_a_weights_tree_once_and_an_executing_run_reads_it_fresh(
        mirror, tmp_path, monkeypatch):
    """The preflight's Hub check, the weights' Hub check and the tidy-up share one read of
    the folder while planning; the fetch operation reads its own (pyinfra runs it again while
    executing), and so does every ask while executing."""
    data, listing, tree = hub_path(mirror, tmp_path, monkeypatch)
    asked = []
    process = facts.WeightsTree.process
    monkeypatch.setattr(facts.WeightsTree, "process",
                        lambda fact, output: asked.append(1) or process(fact, output))
    inventory = Inventory(([("@fake/h1", {**data, "fake_responses": {tree: hub_tree(listing)},
                                           "fake_delay": 0, "fake_delay_jitter": 0})], {}))
    state = State(inventory, Config())
    connect_all(state)
    host = inventory.get_host("@fake/h1")
    target = weights.Target("model", SANDBOX_REPO, "main", MODEL_DIR)
    settings, hub = read_settings(host), weights_hub.read_hub_settings(host.name, host.data)
    with ctx_state.use(state), ctx_host.use(host):
        assert weights.problems(host, settings, hub) == []
        assert weights.problems(host, settings, hub) == []
        assert weights.planned_tree(host, target)["manifest"]["complete"]
        assert len(asked) == 1
        state.is_executing = True
        weights.planned_tree(host, target)
        weights.planned_tree(host, target)
        assert len(asked) == 3


def test_the_hub_path_schedules_a_deep_verify_at_idle_priority_unless_told_not_to(
        mirror, tmp_path, monkeypatch):
    data, listing, tree = hub_path(mirror, tmp_path, monkeypatch)
    target = weights.Target("model", SANDBOX_REPO, "main", MODEL_DIR)
    service, timer = (f"{weights.UNIT_DIR}/{unit}"
                      for unit in (target.verify_unit, target.verify_timer))
    plan, _ = plan_place(data, {tree: hub_tree(listing)})
    assert f"upload {service}" in plan[f"Install {target.verify_unit}"]
    assert f"upload {timer}" in plan[f"Install {target.verify_timer}"]
    assert f"systemctl start {target.verify_timer}" in plan[
        f"Enable and start {target.verify_timer}, reload systemd if a unit changed"]
    plan, _ = plan_place({**data, "weights_verify_schedule": None}, {tree: hub_tree(listing)})
    assert not [name for name in plan if "weights-verify" in name]
    values = weights.verify_unit_values(target, "Sun *-*-* 03:00", "/opt/hf/bin/python3")
    rendered = {kind: get_template(str(weights.TEMPLATES / f"weights-verify.{kind}.j2"))
                .render(values) for kind in ("service", "timer")}
    assert (f"ExecStart=/opt/hf/bin/python3 {weights_job.HOST_SCRIPT} --job {target.job_file} "
            f"--audit {target.audit_file}\n") in rendered["service"]
    for line in ("IOSchedulingClass=idle", "Nice=19", "SuccessExitStatus=75",
                 f"ReadWritePaths=-{MODEL_DIR}/.cache {target.state_dir}"):
        assert f"\n{line}\n" in rendered["service"]
    assert "\nOnCalendar=Sun *-*-* 03:00\n" in rendered["timer"]
    assert f"\nUnit={target.verify_unit}\n" in rendered["timer"]


@pytest.mark.parametrize("schedule", ["0 3 * * 0", "@weekly", "", "weekly\nOnCalendar=daily"])
def test_a_cron_line_as_verify_schedule_is_refused(schedule):
    with pytest.raises(DataError) as error:
        weights_hub.read_hub_settings("h1", {**group_data(), "weights_verify_schedule": schedule},
                                      environ={})
    assert "h1: weights_verify_schedule: found " in str(error.value)


def installed_verifies(*targets: weights.Target) -> dict:
    """The FindFiles answer of a host with these folders' scheduled verifies installed."""
    return {fact_command(FindFiles, path=weights.UNIT_DIR, maxdepth=1,
                         fname=weights.VERIFY_UNITS): [
        f"{weights.UNIT_DIR}/{unit}" for target in targets
        for unit in (target.verify_unit, target.verify_timer)]}


def test_no_schedule_removes_a_verify_timer_an_earlier_deploy_installed(controller_folders):
    """The push path (or weights_verify_schedule = None) leaves no scheduled verify behind:
    its job would check the folder against a listing that no longer applies."""
    data = push_data(controller_folders)
    target = weights.Target("model", "", "", MODEL_DIR)
    plan, restart = plan_place(data, {**pushed_tree(Path(data["model_source_dir"])),
                                      **installed_verifies(target)})
    assert plan == {"Remove the scheduled verifies of weights folders not declared here": [
        f"systemctl disable --now {target.verify_timer}",
        f"rm -f {weights.UNIT_DIR}/{target.verify_unit} {weights.UNIT_DIR}/{target.verify_timer}",
        "systemctl daemon-reload"]}
    assert not restart


def test_a_moved_weights_dir_leaves_no_verify_of_the_old_folder(mirror, tmp_path, monkeypatch):
    data, listing, tree = hub_path(mirror, tmp_path, monkeypatch)
    current = weights.Target("model", SANDBOX_REPO, "main", MODEL_DIR)
    old = weights.Target("model", SANDBOX_REPO, "main", "/raid/old-models/tiny-kimi")
    plan, restart = plan_place(data, {tree: hub_tree(listing),
                                      **installed_verifies(current, old)})
    assert plan["Remove the scheduled verifies of weights folders not declared here"] == [
        f"systemctl disable --now {old.verify_timer}",
        f"rm -f {weights.UNIT_DIR}/{old.verify_unit} {weights.UNIT_DIR}/{old.verify_timer}",
        "systemctl daemon-reload"]
    assert not restart
    plan, _ = plan_place(data, {tree: hub_tree(listing), **installed_verifies(current)})
    assert "Remove the scheduled verifies of weights folders not declared here" not in plan
