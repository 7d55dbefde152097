"""hub-mirror (harness/hub_mirror.py): the real `hf` CLI downloads from it offline, byte for byte; a re-run fetches
nothing; a broken or stalled transfer still ends with the right bytes; a wrong repo, revision or
missing token fails with a message that names the problem."""

import hashlib
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.helpers import REPO

HF = REPO / ".venv" / "bin" / "hf"
# Run from the checkout, as `python -m` finds the package there with or without the venv.
MIRROR = [sys.executable, "-m", "harness.hub_mirror"]
MODEL_REPO = "test-org/tiny-kimi"
SPARSE_REPO = "test-org/sparse"
SHARD = "model-00001-of-00002.safetensors"
# huggingface_hub writes a download to disk in pieces of this size, and after a broken
# connection resumes from the last piece it wrote: only files past it show a Range request.
CLIENT_PIECE = 10 * 1024 * 1024
SPARSE_SIZE = 3 * CLIENT_PIECE
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1024 * 1024):
            digest.update(block)
    return digest.hexdigest()


def digests(folder: Path) -> dict[str, str]:
    """sha256 of every file, by path; `hf download --local-dir` keeps its bookkeeping in .cache/."""
    return {path.relative_to(folder).as_posix(): sha256_of(path)
            for path in sorted(folder.rglob("*"))
            if path.is_file() and path.relative_to(folder).parts[0] != ".cache"}


def expected_commit(folder: Path) -> str:
    """The commit SHA the mirror promises: sha1 over the sorted (path, sha256) manifest."""
    manifest = "".join(f"{path}\0{digest}\n" for path, digest in sorted(digests(folder).items()))
    return hashlib.sha1(manifest.encode()).hexdigest()


def git_blob_id(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


class Mirror:
    """One hub-mirror process on loopback, found through the state file it writes."""

    def __init__(self, workdir: Path, repos: dict[str, Path], token: str | None = None):
        workdir.mkdir(parents=True, exist_ok=True)
        self.state_file = workdir / "mirror.json"
        self.log_file = workdir / "mirror.log"
        self.token = token
        command = [*MIRROR, "--listen", "127.0.0.1:0",
                   "--state-file", str(self.state_file)]
        for repo_id, folder in repos.items():
            command += ["--repo", f"{repo_id}={folder}"]
        if token is not None:
            token_file = workdir / "token"
            token_file.write_text(token + "\n")
            command += ["--token-file", str(token_file)]
        with open(self.log_file, "wb") as log:
            self.process = subprocess.Popen(command, cwd=REPO, stdout=log,
                                            stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 30
            while not self.state_file.exists():
                assert self.process.poll() is None, f"hub-mirror exited:\n{self.log()}"
                assert time.monotonic() < deadline, f"hub-mirror did not start:\n{self.log()}"
                time.sleep(0.05)
            state = json.loads(self.state_file.read_text())
            assert state["pid"] == self.process.pid
            self.url = state["url"]
        except BaseException:
            self.stop()
            raise

    def reset(self) -> "Mirror":
        """Zero the byte counters and clear injected faults: a clean slate for one test."""
        assert self.call("POST", "/_mirror/stats/reset")[0] == 200
        assert self.call("DELETE", "/_mirror/faults")[0] == 200
        return self

    def stop(self) -> int:
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(self.process.pid, signal.SIGKILL)
                self.process.wait()
        return self.process.returncode

    def log(self) -> str:
        return self.log_file.read_text(errors="replace")

    def call(self, method: str, path: str, body=None, headers: dict | None = None,
             with_token: bool = True):
        """(status, headers, body) of one request; HTTP errors are answers here, not failures."""
        request = urllib.request.Request(
            self.url + path, method=method, headers=dict(headers or {}),
            data=json.dumps(body).encode() if body is not None else None)
        if with_token and self.token:
            request.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, response.headers, response.read()
        except urllib.error.HTTPError as error:
            return error.code, error.headers, error.read()

    def stats(self) -> dict:
        status, _, body = self.call("GET", "/_mirror/stats")
        assert status == 200
        return json.loads(body)

    def add_fault(self, **fault) -> None:
        status, _, body = self.call("POST", "/_mirror/faults", fault)
        assert status == 200, body

    def file_requests(self, repo_id: str, path: str) -> list[dict]:
        return [entry for entry in self.stats()["requests"]
                if entry["method"] == "GET" and entry["path"].startswith(f"/{repo_id}/resolve/")
                and entry["path"].endswith(f"/{path}")]


def hf_download(mirror: Mirror, home: Path, *args: str, token: str | None = None,
                environment: dict | None = None) -> subprocess.CompletedProcess:
    """The real CLI, from a clean environment: no developer token or settings leak in, and the
    once-a-day update check (which would try the internet) is off."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home),
           "HF_HOME": str(home / "hf-home"), "HF_ENDPOINT": mirror.url,
           "HF_HUB_DISABLE_UPDATE_CHECK": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
           "HF_HUB_DISABLE_PROGRESS_BARS": "1", "NO_COLOR": "1", **(environment or {})}
    if token is not None:
        env["HF_TOKEN"] = token  # the environment, never argv: argv is world-readable in ps
    result = subprocess.run([str(HF), "download", *args], env=env, capture_output=True,
                            text=True, timeout=60)
    result.output = ANSI_ESCAPE.sub("", result.stdout + result.stderr)
    return result


@pytest.fixture(scope="module")
def sparse_model(tmp_path_factory) -> Path:
    """A shard bigger than the client's write piece, sparse so it costs no disk."""
    out = tmp_path_factory.mktemp("sparse-model")
    with open(out / "model.safetensors", "wb") as handle:
        handle.truncate(SPARSE_SIZE)
    (out / "config.json").write_text("{}\n")
    return out


@pytest.fixture(scope="module")
def module_mirror(tmp_path_factory, tiny_model, sparse_model):
    mirror = Mirror(tmp_path_factory.mktemp("mirror"),
                    {MODEL_REPO: tiny_model, SPARSE_REPO: sparse_model})
    yield mirror
    mirror.stop()


@pytest.fixture
def mirror(module_mirror):
    return module_mirror.reset()


def test_fresh_download_is_byte_identical(mirror, tiny_model, tmp_path):
    commit = expected_commit(tiny_model)
    result = hf_download(mirror, tmp_path, MODEL_REPO, "--revision", commit,
                         "--local-dir", str(tmp_path / "out"))
    assert result.returncode == 0, result.output
    assert digests(tmp_path / "out") == digests(tiny_model)
    # Every file crossed the wire exactly once.
    assert mirror.stats()["bytes_sent"] == {
        f"{MODEL_REPO}/{path.name}": path.stat().st_size for path in tiny_model.iterdir()}


def test_second_download_sends_no_file_bytes(mirror, tiny_model, tmp_path):
    commit = expected_commit(tiny_model)
    args = (MODEL_REPO, "--revision", commit, "--local-dir", str(tmp_path / "out"))
    assert hf_download(mirror, tmp_path, *args).returncode == 0
    mirror.call("POST", "/_mirror/stats/reset")
    started = time.monotonic()
    result = hf_download(mirror, tmp_path, *args)
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.output
    stats = mirror.stats()
    assert stats["bytes_sent"] == {}
    # Pinned to a commit, the client trusts its local metadata: no tree listing, no HEAD.
    assert not [entry for entry in stats["requests"] if f"/{MODEL_REPO}/" in entry["path"]]
    assert elapsed < 10, f"a no-op re-run took {elapsed:.1f}s"
    assert digests(tmp_path / "out") == digests(tiny_model)


def parse_size(text: str) -> tuple[float, int]:
    """Bytes, and the unit they were printed in, from the CLI's decimal sizes ("853.7K")."""
    number, unit = re.fullmatch(r"([0-9.]+)([KMGT]?)", text).groups()
    unit_bytes = 1000 ** " KMGT".index(unit or " ")
    return float(number) * unit_bytes, unit_bytes


def test_dry_run_reports_every_file_and_its_size(mirror, tiny_model, tmp_path):
    result = hf_download(mirror, tmp_path, MODEL_REPO, "--revision", expected_commit(tiny_model),
                         "--local-dir", str(tmp_path / "out"), "--dry-run")
    assert result.returncode == 0, result.output
    assert "Will download 7 files (out of 7)" in result.output
    reported = {}
    for line in result.output.splitlines():
        fields = line.split()
        if len(fields) == 2 and (tiny_model / fields[0]).is_file():
            reported[fields[0]] = parse_size(fields[1])
    sizes = {path.name: path.stat().st_size for path in tiny_model.iterdir()}
    assert reported.keys() == sizes.keys(), result.output
    for name, size in sizes.items():
        shown, unit_bytes = reported[name]
        assert abs(shown - size) <= 0.05 * unit_bytes, name  # the CLI prints one decimal
    assert mirror.stats()["bytes_sent"] == {}
    assert not (tmp_path / "out" / SHARD).exists()


def test_dropped_connection_mid_shard_still_completes(mirror, tiny_model, tmp_path):
    mirror.add_fault(path=f"{MODEL_REPO}/{SHARD}", drop_after_bytes=300_000, times=1)
    result = hf_download(mirror, tmp_path, MODEL_REPO, "--revision", expected_commit(tiny_model),
                         "--local-dir", str(tmp_path / "out"))
    assert result.returncode == 0, result.output
    assert "Trying to resume download" in result.output
    assert sha256_of(tmp_path / "out" / SHARD) == sha256_of(tiny_model / SHARD)
    # Less than one client piece had reached the disk, so the retry starts again from byte 0.
    assert [entry["status"] for entry in mirror.file_requests(MODEL_REPO, SHARD)] == [200, 200]
    assert mirror.stats()["bytes_sent"][f"{MODEL_REPO}/{SHARD}"] == \
        300_000 + (tiny_model / SHARD).stat().st_size


def test_dropped_connection_in_a_large_shard_resumes_with_a_range_request(
        mirror, sparse_model, tmp_path):
    drop_at = 2 * CLIENT_PIECE + 12345
    mirror.add_fault(path=f"{SPARSE_REPO}/model.safetensors", drop_after_bytes=drop_at, times=1)
    result = hf_download(mirror, tmp_path, SPARSE_REPO, "--local-dir", str(tmp_path / "out"))
    assert result.returncode == 0, result.output
    assert digests(tmp_path / "out") == digests(sparse_model)
    requests = mirror.file_requests(SPARSE_REPO, "model.safetensors")
    assert [(entry["status"], entry["range"]) for entry in requests] == [
        (200, None), (206, f"bytes={2 * CLIENT_PIECE}-")]
    # Only what the client had not yet written was sent twice.
    assert mirror.stats()["bytes_sent"][f"{SPARSE_REPO}/model.safetensors"] == \
        drop_at + SPARSE_SIZE - 2 * CLIENT_PIECE


def test_reset_connection_fails_the_run_and_a_rerun_fetches_only_what_is_missing(
        mirror, tiny_model, tmp_path):
    # Unlike a closed connection, a TCP reset is not retried by the 2.4 client: whoever runs
    # `hf download` must run it again, and that must cost only the missing file.
    mirror.add_fault(path=f"{MODEL_REPO}/{SHARD}", reset_after_bytes=300_000, times=1)
    args = (MODEL_REPO, "--revision", expected_commit(tiny_model), "--local-dir",
            str(tmp_path / "out"))
    failed = hf_download(mirror, tmp_path, *args)
    assert failed.returncode != 0
    assert "Connection reset by peer" in failed.output
    assert not (tmp_path / "out" / SHARD).exists()
    assert not list((tmp_path / "out").rglob("*.incomplete"))

    mirror.call("POST", "/_mirror/stats/reset")
    result = hf_download(mirror, tmp_path, *args)
    assert result.returncode == 0, result.output
    assert digests(tmp_path / "out") == digests(tiny_model)
    assert mirror.stats()["bytes_sent"] == {
        f"{MODEL_REPO}/{SHARD}": (tiny_model / SHARD).stat().st_size}


def test_stalled_transfer_recovers_by_the_clients_own_read_timeout(mirror, sparse_model, tmp_path):
    stall_seconds = 20
    mirror.add_fault(path=f"{SPARSE_REPO}/model.safetensors", stall_after_bytes=CLIENT_PIECE + 1000,
                     stall_seconds=stall_seconds, times=1)
    started = time.monotonic()
    result = hf_download(mirror, tmp_path, SPARSE_REPO, "--local-dir", str(tmp_path / "out"),
                         environment={"HF_HUB_DOWNLOAD_TIMEOUT": "1"})
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.output
    assert digests(tmp_path / "out") == digests(sparse_model)
    assert elapsed < stall_seconds, "the client waited for the stall instead of resuming"
    ranges = [entry["range"] for entry in mirror.file_requests(SPARSE_REPO, "model.safetensors")]
    assert f"bytes={CLIENT_PIECE}-" in ranges


def test_a_trickling_stall_holds_the_client_until_the_faults_are_cleared(mirror, sparse_model,
                                                                        tmp_path):
    """A slow mirror (the e2e's overlap of the fetch with the runtime step): a byte a second
    outlasts the client's read timeout (its default, 10 s) with no resume; a clear of the faults
    ends the stall at once, and the download completes byte for byte."""
    mirror.add_fault(path=f"{SPARSE_REPO}/model.safetensors", stall_after_bytes=1000,
                     stall_seconds=300, trickle=True)
    done = []
    fetching = threading.Thread(target=lambda: done.append(hf_download(
        mirror, tmp_path, SPARSE_REPO, "--local-dir", str(tmp_path / "out"))))
    fetching.start()
    time.sleep(13)
    assert fetching.is_alive() and not done, done and done[0].output
    held = mirror.stats()["bytes_sent"][f"{SPARSE_REPO}/model.safetensors"]
    assert 1000 < held < 1000 + 16, "a byte a second while it stalls"
    released = time.monotonic()
    assert mirror.call("DELETE", "/_mirror/faults")[0] == 200
    fetching.join(timeout=60)
    assert done and done[0].returncode == 0, done and done[0].output
    assert time.monotonic() - released < 30
    assert digests(tmp_path / "out") == digests(sparse_model)
    # (A stalled response of the test before may end and be counted here: no range, though.)
    resumed = [entry for entry in mirror.file_requests(SPARSE_REPO, "model.safetensors")
               if entry.get("range")]
    assert resumed == [], "the client resumed: the trickle did not hold it"


def test_unknown_repo_fails_and_names_it(mirror, tmp_path):
    result = hf_download(mirror, tmp_path, "test-org/no-such-model", "--local-dir",
                         str(tmp_path / "out"))
    assert result.returncode != 0
    assert "'test-org/no-such-model' not found" in result.output, result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize("revision", ["v2", "0123456789abcdef0123456789abcdef01234567"])
def test_unknown_revision_fails_and_names_the_problem(mirror, tmp_path, revision):
    result = hf_download(mirror, tmp_path, MODEL_REPO, "--revision", revision, "--local-dir",
                         str(tmp_path / "out"))
    assert result.returncode != 0
    assert f"Revision not found in model '{MODEL_REPO}'" in result.output, result.output
    assert not (tmp_path / "out" / SHARD).exists()


def test_token_is_required_when_set_and_never_logged(tiny_model, tmp_path):
    token = "hf_" + secrets.token_hex(16)
    mirror = Mirror(tmp_path / "mirror", {MODEL_REPO: tiny_model}, token=token)
    try:
        refused = hf_download(mirror, tmp_path, MODEL_REPO, "--local-dir", str(tmp_path / "a"))
        assert refused.returncode != 0
        assert f"'{MODEL_REPO}' not found" in refused.output, refused.output
        assert "authenticated" in refused.output
        assert not (tmp_path / "a" / SHARD).exists()

        status, headers, _ = mirror.call("GET", f"/api/models/{MODEL_REPO}",
                                         headers={"Authorization": "Bearer wrong"},
                                         with_token=False)
        assert (status, headers["X-Error-Code"]) == (401, "RepoNotFound")
        assert mirror.call("GET", "/_mirror/stats", with_token=False)[0] == 401

        accepted = hf_download(mirror, tmp_path, MODEL_REPO, "--local-dir", str(tmp_path / "b"),
                               token=token)
        assert accepted.returncode == 0, accepted.output
        assert token not in " ".join(accepted.args)
        assert digests(tmp_path / "b") == digests(tiny_model)
        assert token not in accepted.output
    finally:
        mirror.stop()
    log = mirror.log()
    assert f"/{MODEL_REPO}/resolve/" in log  # the log does record the downloads...
    assert token not in log                  # ...and never the token


def test_mirror_answers_like_the_hub(mirror, tiny_model):
    commit = expected_commit(tiny_model)
    status, _, body = mirror.call("GET", f"/api/models/{MODEL_REPO}")
    info = json.loads(body)
    assert (status, info["id"], info["sha"]) == (200, MODEL_REPO, commit)
    assert sorted(s["rfilename"] for s in info["siblings"]) == sorted(digests(tiny_model))

    status, _, body = mirror.call("GET", f"/api/models/{MODEL_REPO}/tree/main?recursive=true")
    tree = {entry["path"]: entry for entry in json.loads(body)}
    config = (tiny_model / "config.json").read_bytes()
    assert tree["config.json"]["oid"] == git_blob_id(config)
    assert "lfs" not in tree["config.json"]
    assert tree[SHARD]["lfs"]["oid"] == sha256_of(tiny_model / SHARD)
    assert tree[SHARD]["size"] == tree[SHARD]["lfs"]["size"] == (tiny_model / SHARD).stat().st_size

    status, headers, _ = mirror.call("HEAD", f"/{MODEL_REPO}/resolve/main/{SHARD}")
    assert status == 200
    assert headers["X-Repo-Commit"] == commit
    assert headers["ETag"] == headers["X-Linked-Etag"] == f'"{sha256_of(tiny_model / SHARD)}"'
    assert int(headers["X-Linked-Size"]) == int(headers["Content-Length"]) == tree[SHARD]["size"]
    assert "X-Xet-Hash" not in headers  # its presence would switch the client to Xet
    status, headers, _ = mirror.call("HEAD", f"/{MODEL_REPO}/resolve/{commit}/config.json")
    assert (status, headers["ETag"]) == (200, f'"{git_blob_id(config)}"')
    assert "X-Linked-Etag" not in headers

    shard = (tiny_model / SHARD).read_bytes()
    for requested, first, last in (("bytes=100-199", 100, 199),
                                   ("bytes=500000-", 500000, len(shard) - 1)):
        status, headers, body = mirror.call("GET", f"/{MODEL_REPO}/resolve/main/{SHARD}",
                                            headers={"Range": requested})
        assert status == 206
        assert headers["Content-Range"] == f"bytes {first}-{last}/{len(shard)}"
        assert body == shard[first:last + 1]
    status, _, _ = mirror.call("GET", f"/{MODEL_REPO}/resolve/main/{SHARD}",
                               headers={"Range": f"bytes={len(shard)}-"})
    assert status == 416

    status, headers, _ = mirror.call("HEAD", f"/{MODEL_REPO}/resolve/main/missing.json")
    assert (status, headers["X-Error-Code"], headers["X-Repo-Commit"]) == (404, "EntryNotFound",
                                                                          commit)
    status, headers, _ = mirror.call("GET", f"/api/models/{MODEL_REPO}/revision/v2")
    assert (status, headers["X-Error-Code"]) == (404, "RevisionNotFound")
    status, headers, _ = mirror.call("GET", "/api/models/test-org/nothing")
    assert (status, headers["X-Error-Code"]) == (401, "RepoNotFound")
    # A JSON list here crashes the 2.4 CLI; an object is what it can live with.
    status, _, body = mirror.call("GET", "/api/agent-harnesses")
    assert status == 404 and isinstance(json.loads(body), dict)


def test_print_revisions_gives_the_served_commit_without_serving(tiny_model):
    result = subprocess.run([*MIRROR, "--print-revisions", "--repo", f"{MODEL_REPO}={tiny_model}"],
                            cwd=REPO, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{MODEL_REPO} {expected_commit(tiny_model)}\n"


def test_hash_cache_is_reused_until_a_file_changes(tiny_model, tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    for path in tiny_model.iterdir():
        (model / path.name).write_bytes(path.read_bytes())
    command = [*MIRROR, "--print-revisions", "--repo", f"{MODEL_REPO}={model}",
               "--hash-cache", str(tmp_path / "hashes.json")]

    def run() -> tuple[str, str]:
        result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=30,
                                check=True)
        return result.stdout.split()[1], result.stderr

    first, first_log = run()
    second, second_log = run()
    assert "0 from the hash cache" in first_log
    assert "7 from the hash cache" in second_log
    assert first == second == expected_commit(tiny_model)
    with open(model / "config.json", "a") as handle:
        handle.write("\n")
    changed, changed_log = run()
    assert "6 from the hash cache" in changed_log
    assert changed == expected_commit(model) != first


def test_sigterm_stops_it_cleanly(tiny_model, tmp_path):
    mirror = Mirror(tmp_path, {MODEL_REPO: tiny_model})
    try:
        assert re.fullmatch(r"http://127\.0\.0\.1:[0-9]+", mirror.url)
        assert not mirror.url.endswith(":0")  # port 0 asked for a free port; the real one is here
        assert mirror.call("GET", f"/api/models/{MODEL_REPO}")[0] == 200
    finally:
        returncode = mirror.stop()
    assert returncode == 0, mirror.log()
    assert not mirror.state_file.exists()
    assert mirror.log().rstrip().endswith("hub-mirror: stopped")
