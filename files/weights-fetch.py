#!/usr/bin/env python3
# Managed by tasks/weights.py: runs on the host, as a transient systemd unit, under the hf venv.
"""Fetch one Hub repo at one commit into a folder with the pinned `hf` CLI, verified, resumable.

    weights-fetch.py --job JOB.json [--verify | --audit STATUS.json]
    weights-fetch.py --serve ADDR:PORT --job JOB.json [--job JOB.json ...]

JOB.json is written by the deploy; its fields, the status file this script keeps for the deploy
to follow and the manifest it leaves in the folder are defined in tasks/weights_job.py. The job
names every path this script touches (under "paths"), so nothing here re-declares them.

Why this wrapper and not a bare `hf download`: the client checks sizes only (never sha256),
exits 1 on a reset connection, may hang on Xet, and leaves `*.incomplete` files behind when
killed (each restart writes a new one from byte 0). Here every attempt starts by removing those,
a watchdog stops an attempt that makes no progress and retries with Xet off, every file is
hashed once against the Hub's checksum, and a bad one is deleted and fetched again.

--verify re-hashes every file instead, reports missing, corrupt and extra files, deletes the
corrupt ones (so the next deploy fetches them) and exits 1 if any file is missing or corrupt.

--audit (the scheduled deep verify, weights-verify-*.timer) re-hashes every file too but
deletes nothing: vLLM may be serving from the folder, and a restart must still find every
shard. It reports in its own status file (STATUS.json, not the fetch's), drops the files it
finds missing or corrupt from the manifest (so the drift check plans their fetch and the next
deploy fetches them), and exits 1 if any is; 75 if a fetch holds the folder (skipped).

Fetched once per fleet (weights_peer_copy): a job may name peers, other hosts running this
script with --serve. Before the Hub, the fetch copies from them, in order, each file the peer
holds verified (its manifest, unchanged since it was hashed) and whose checksum is the one the
Hub lists: a peer still fetching is waited for while it makes progress, and what a peer copied
it serves on to its own peers as soon as it is here. Every copy is hashed as it arrives against
the Hub's checksum and moved into place only if it matches, so a peer can make a fetch slower,
never wrong. A peer that is down, dies mid-copy or serves a bad file is left for the next one;
what no peer gives, `hf download` fetches from the Hub, by name (the client would otherwise
fetch again every file it holds no record of).

--serve answers, for the folders of the jobs it is given (read again on every request):
    GET /v1/COMMIT/offer          {"files": {PATH: checksum}, "fetching": bool, "bytes_done"}
    GET /v1/COMMIT/files/PATH     the file, if the offer holds it (404 otherwise)
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import errno
import fcntl
import hashlib
import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

BLOCK = 8 * 1024 * 1024
POLL_S = 1.0
# hf answers SIGTERM within a second or two; past this it is stuck in a syscall.
KILL_AFTER_S = 15
# Exit status when another run holds the folder's lock (EX_TEMPFAIL): the scheduled verify
# counts it as skipped, not failed.
LOCKED = 75
# A peer's fetch counts as running while its status file is this fresh (written every second).
STATUS_FRESH_S = 30
# How long a fetch waits for a peer that answers but holds no job of this commit yet (its
# deploy pushes the job in the same step as this one's).
PEER_GRACE_S = 30
# Seconds a peer may leave a copy's connection without a byte.
PEER_READ_TIMEOUT_S = 30
ACTIVE_STATES = ("starting", "fetching", "copying", "verifying")


def log(message: str) -> None:
    print(f"weights-fetch: {message}", file=sys.stderr, flush=True)


def write_json(path: Path, value: dict) -> None:
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(json.dumps(value, indent=1, sort_keys=True) + "\n")
    partial.replace(path)


def new_digest(want: dict):
    """A hash of the kind the Hub lists for this file: sha256 for LFS files, git's blob sha1
    (over a header naming the listed size) else."""
    if want.get("sha256"):
        return hashlib.sha256()
    return hashlib.sha1(b"blob %d\0" % want["size"])


def file_checksum(path: Path, want: dict) -> str:
    """The file's checksum of the kind the Hub lists for it."""
    digest = new_digest({**want, "size": path.stat().st_size})
    with open(path, "rb") as handle:
        while block := handle.read(BLOCK):
            digest.update(block)
    return digest.hexdigest()


def manifest_entry(stat: os.stat_result, checksum: str) -> dict:
    """A file's manifest entry: its checksum, and the size and mtime it had when hashed."""
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "checksum": checksum}


def expected_checksum(want: dict) -> str:
    return want.get("sha256") or want["git_sha1"]


def read_job(path: Path) -> dict:
    job = json.loads(path.read_text())
    if "paths" not in job:
        raise SystemExit(f"weights-fetch: {path} names no paths: a job of an older deploy; "
                         "deploy again")
    return job


class Fetch:
    def __init__(self, job: dict, status_file: Path | None = None):
        self.job = job
        paths = job["paths"]
        self.local_dir = Path(job["local_dir"])
        self.state_dir = Path(job["state_dir"])
        self.manifest = self.local_dir / paths["manifest"]
        self.records_prefix = f"{paths['records_dir']}/"
        self.client_records = self.local_dir / paths["client_records_dir"]
        self.incomplete_glob = paths["incomplete_glob"]
        self.status_file = status_file or self.state_dir / paths["status_file"]
        self.hf_home = self.state_dir / paths["hf_home"]
        self.no_token = self.state_dir / paths["no_token_file"]
        self.files: dict[str, dict] = job["files"]
        self.total = sum(want["size"] for want in self.files.values())
        self.status = {"state": "starting", "attempt": 0, "attempts": job["attempts"],
                       "bytes_done": 0, "bytes_total": self.total, "rate_bytes_per_s": 0.0,
                       "message": "", "missing": [], "corrupt": [], "extra": [],
                       "commit": job["commit"], "repo": job["repo"], "pid": os.getpid()}
        self.samples: collections.deque = collections.deque(maxlen=10)
        self.verified: dict[str, dict] = {}
        self.child: subprocess.Popen | None = None
        self.stopping = False
        self.no_space = False  # a peer copy hit a full disk: the fetch stops saying so
        self.manifest_lock = threading.Lock()  # peer copies record files in parallel
        self.load_manifest()

    # --- status and manifest --------------------------------------------------------------

    def report(self, **changes) -> None:
        self.status.update(changes, updated=time.time())
        write_json(self.status_file, self.status)

    def load_manifest(self) -> None:
        """Entries of an earlier run still valid for this listing: same checksum, same stat."""
        try:
            manifest = json.loads(self.manifest.read_text())
        except (OSError, ValueError):
            return
        for path, entry in manifest.get("files", {}).items():
            want = self.files.get(path)
            if want is not None and entry.get("checksum") == expected_checksum(want) \
                    and self.unchanged(path, entry):
                self.verified[path] = entry

    def unchanged(self, path: str, entry: dict) -> bool:
        """The file still has the size and mtime it had when it was hashed."""
        try:
            stat = (self.local_dir / path).stat()
        except OSError:
            return False
        return (stat.st_size, stat.st_mtime_ns) == (entry["size"], entry["mtime_ns"])

    def forget_rewritten(self) -> None:
        """Drop the checks of files written since they were hashed: the client writes again
        every file it holds no metadata for (a folder the push path filled, say), and a
        manifest naming the old mtimes would send the next deploy fetching, and restarting
        vLLM, once more."""
        for path, entry in list(self.verified.items()):
            if not self.unchanged(path, entry):
                del self.verified[path]

    def save_manifest(self, complete: bool) -> None:
        with self.manifest_lock:
            self.manifest.parent.mkdir(parents=True, exist_ok=True)
            write_json(self.manifest, {
                "repo": self.job["repo"], "commit": self.job["commit"], "complete": complete,
                "files": dict(sorted(self.verified.items()))})

    def record(self, path: str, entry: dict) -> None:
        """A file verified while others are (peer copies, hashes during a download): in the
        manifest at once, so that this host's server offers it to its peers."""
        with self.manifest_lock:
            self.verified[path] = entry
        self.save_manifest(complete=False)

    def offer(self, job_written: float) -> dict:
        """What this folder can give a peer (--serve): files verified and unchanged since, and
        whether its fetch runs (a job written moments ago with no status yet is starting: the
        deploy removes the status file before it starts the unit)."""
        try:
            status = json.loads(self.status_file.read_text())
        except (OSError, ValueError):
            status = {"state": "starting", "updated": job_written}
        fetching = status.get("state") in ACTIVE_STATES \
            and time.time() - status.get("updated", 0) < STATUS_FRESH_S
        return {"files": {path: entry["checksum"] for path, entry in self.verified.items()},
                "fetching": fetching, "bytes_done": status.get("bytes_done", 0)}

    # --- the folder -----------------------------------------------------------------------

    def incomplete_files(self) -> list[Path]:
        """The client's temp files, which it never resumes (each restart writes a new one)."""
        if not self.client_records.is_dir():
            return []
        return list(self.client_records.rglob(self.incomplete_glob))

    def remove_incomplete(self) -> int:
        """Temp files of an interrupted client: the next one never resumes them."""
        removed = 0
        for partial in self.incomplete_files():
            removed += partial.stat().st_size
            partial.unlink()
        return removed

    def forget(self, path: str) -> None:
        """Delete a file and the client's record of it, so the client fetches it again."""
        self.verified.pop(path, None)
        for stale in (self.local_dir / path, self.client_records / f"{path}.metadata"):
            stale.unlink(missing_ok=True)

    def remove_undeclared(self) -> None:
        """Files this listing does not hold, outside .cache/: an earlier revision's, or placed
        by hand. vLLM reads the folder, so a stray shard or chat template would change what
        runs (tasks/weights.py removes them from a complete tree; --verify only reports them)."""
        for path in self.extra_files():
            log(f"removing {path}: not in {self.job['repo']}@{self.job['commit'][:12]}")
            (self.local_dir / path).unlink()

    def extra_files(self) -> list[str]:
        extra = []
        for path in sorted(self.local_dir.rglob("*")):
            relative = path.relative_to(self.local_dir).as_posix()
            if path.is_file() and not relative.startswith(self.records_prefix) \
                    and relative not in self.files:
                extra.append(relative)
        return extra

    def bytes_done(self) -> int:
        done = 0
        for path, want in self.files.items():
            try:
                done += min((self.local_dir / path).stat().st_size, want["size"])
            except OSError:
                pass
        for partial in self.incomplete_files():
            try:
                done += partial.stat().st_size
            except OSError:
                pass  # renamed into place between the listing and the stat
        return min(done, self.total)

    def check(self, paths: list[str], state: str) -> tuple[list[str], list[str]]:
        """Hash files not yet verified; returns (missing, corrupt). Corrupt files are deleted."""
        missing, corrupt, todo = self.triage(paths)
        corrupt += self.hash_files(todo, state)
        for path in corrupt:
            self.forget(path)
        self.save_manifest(complete=False)
        return missing, sorted(corrupt)

    def triage(self, paths: list[str]) -> tuple[list[str], list[str], list[str]]:
        """(missing, corrupt by their size alone, worth hashing)."""
        missing, corrupt, todo = [], [], []
        for path in paths:
            want = self.files[path]
            target = self.local_dir / path
            if not target.is_file():
                missing.append(path)
            elif target.stat().st_size != want["size"]:
                log(f"{path}: {target.stat().st_size} bytes, the Hub lists {want['size']}")
                corrupt.append(path)
            else:
                todo.append(path)
        return missing, corrupt, todo

    def hash_files(self, todo: list[str], state: str) -> list[str]:
        """Hash ``todo`` in parallel, reporting the bytes hashed; records each match as verified
        (with the stat it had before hashing) and returns the files that do not match."""
        hashed = [0]
        lock = threading.Lock()
        todo_bytes = sum(self.files[path]["size"] for path in todo)
        self.report(state=state, bytes_done=0, bytes_total=todo_bytes,
                    message=f"hashing {len(todo)} files")

        def one(path: str) -> tuple[str, str, os.stat_result]:
            target = self.local_dir / path
            before = target.stat()
            checksum = file_checksum(target, self.files[path])
            with lock:
                hashed[0] += before.st_size
            return path, checksum, before

        corrupt = []
        workers = max(1, min(8, os.cpu_count() or 1))
        with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
            futures = [pool.submit(one, path) for path in todo]
            while not all(future.done() for future in futures):
                time.sleep(POLL_S)
                self.report(bytes_done=hashed[0])
            for future in futures:
                path, checksum, stat = future.result()
                if checksum == expected_checksum(self.files[path]):
                    self.verified[path] = manifest_entry(stat, checksum)
                else:
                    log(f"{path}: checksum {checksum}, the Hub lists "
                        f"{expected_checksum(self.files[path])}")
                    corrupt.append(path)
        return corrupt

    # --- the client -----------------------------------------------------------------------

    def environment(self, xet: bool) -> dict[str, str]:
        env = {key: value for key, value in os.environ.items()
               if not key.startswith("HF_") and key not in ("HUGGING_FACE_HUB_TOKEN",)}
        env.update(HF_HUB_DISABLE_UPDATE_CHECK="1", HF_HUB_DISABLE_TELEMETRY="1",
                   HF_HUB_DISABLE_PROGRESS_BARS="1", HF_HOME=str(self.hf_home))
        if self.job.get("endpoint"):
            env["HF_ENDPOINT"] = self.job["endpoint"]
        # The client reads the token from this root-only file itself: never argv, never env.
        env["HF_TOKEN_PATH"] = self.job.get("token_file") or str(self.no_token)
        if not xet:
            env["HF_HUB_DISABLE_XET"] = "1"
        return env

    def command(self) -> list[str]:
        command = [self.job["hf"], "download", self.job["repo"], "--revision", self.job["commit"],
                   "--local-dir", str(self.local_dir),
                   "--max-workers", str(self.job["max_workers"])]
        if self.job.get("peers"):
            # By name: files copied from peers carry no record of the client's, and it would
            # fetch them again. (--include and --exclude already shaped the listing.)
            return command + [path for path in self.files if path not in self.verified]
        for pattern in self.job.get("include") or []:
            command += ["--include", pattern]
        for pattern in self.job.get("exclude") or []:
            command += ["--exclude", pattern]
        return command

    def attempt(self, number: int, xet: bool) -> str:
        """One run of the client: "exited 0", "exited N" or "stalled"."""
        freed = self.remove_incomplete()
        if freed:
            log(f"removed {freed} bytes of .incomplete files left by an interrupted client")
        log(f"attempt {number}/{self.job['attempts']}: hf download {self.job['repo']} "
            f"--revision {self.job['commit']} (Xet {'on' if xet else 'off'})")
        self.child = subprocess.Popen(self.command(), env=self.environment(xet),
                                      stdin=subprocess.DEVNULL)
        last_bytes, last_progress = -1, time.monotonic()
        hashed: dict[str, tuple[int, int]] = {}
        # Leaving the block waits for the hashes under way: the check after the attempt
        # then hashes only what they did not verify.
        with concurrent.futures.ThreadPoolExecutor(max_workers=2) as hasher:
            while True:
                try:
                    rc = self.child.wait(timeout=POLL_S)
                except subprocess.TimeoutExpired:
                    rc = None
                now = time.monotonic()
                done = self.bytes_done()
                self.report(state="fetching", attempt=number, bytes_done=done,
                            bytes_total=self.total, rate_bytes_per_s=self.rate(now, done),
                            message=f"Xet {'on' if xet else 'off'}")
                if rc is not None:
                    return f"exited {rc}"
                self.hash_arrivals(hasher, hashed)
                if done != last_bytes:
                    last_bytes, last_progress = done, now
                elif now - last_progress > self.job["stall_timeout_s"]:
                    log(f"no progress for {self.job['stall_timeout_s']} s at {done} bytes: "
                        "stopping the client")
                    self.stop_child()
                    return "stalled"

    def hash_arrivals(self, hasher, hashed: dict[str, tuple[int, int]]) -> None:
        """While the client runs, hash each file it has moved into place (it writes elsewhere
        until a file is complete) and record a match at once: the peers that copy from this
        host get it now, not after the last shard, and less is left to hash afterwards. A
        file that does not match is left to the check after the attempt (the client may be
        replacing it); ``hashed`` holds the stat each file was hashed at."""
        for path, want in self.files.items():
            if path in self.verified:
                continue
            try:
                stat = (self.local_dir / path).stat()
            except OSError:
                continue
            if stat.st_size == want["size"] \
                    and hashed.get(path) != (stat.st_size, stat.st_mtime_ns):
                hashed[path] = (stat.st_size, stat.st_mtime_ns)
                hasher.submit(self.hash_arrival, path, stat)

    def hash_arrival(self, path: str, before: os.stat_result) -> None:
        entry = manifest_entry(before, file_checksum(self.local_dir / path, self.files[path]))
        if entry["checksum"] == expected_checksum(self.files[path]) \
                and self.unchanged(path, entry):
            self.record(path, entry)

    def rate(self, now: float, done: int) -> float:
        """Bytes per second over the last samples (a moving window: the rate of now, not of
        the whole attempt), rounded for the status file."""
        self.samples.append((now, done))
        rate = 0.0
        if len(self.samples) > 1 and self.samples[-1][0] > self.samples[0][0]:
            rate = max(0.0, (self.samples[-1][1] - self.samples[0][1])
                       / (self.samples[-1][0] - self.samples[0][0]))
        return round(rate, 1)

    def stop_child(self) -> None:
        if self.child is None or self.child.poll() is not None:
            return
        self.child.terminate()
        try:
            self.child.wait(timeout=KILL_AFTER_S)
        except subprocess.TimeoutExpired:
            self.child.kill()
            self.child.wait()

    # --- peers ----------------------------------------------------------------------------

    def from_peers(self) -> None:
        """Copy from the job's peers, in order, what they hold verified, until every file is
        here or no peer has more to give (module docstring)."""
        peers = list(self.job.get("peers") or [])
        if peers:
            log(f"copying from peers first: {', '.join(peers)}")
        quiet_since, last_progress = time.monotonic(), None
        while peers and not self.stopping and not self.no_space:
            todo = [path for path in self.files if path not in self.verified]
            if not todo:
                return
            peer = peers[0]
            offer, why = self.peer_offer(peer)
            ready = [path for path in todo if offer and offer["files"].get(path)
                     == expected_checksum(self.files[path])]
            now = time.monotonic()
            if ready:
                if not self.copy_from(peer, ready) and not self.no_space:
                    peers.pop(0)
                    log(f"peer {peer} failed a copy; {self.next_source(peers)}")
                quiet_since, last_progress = time.monotonic(), None
                continue
            if offer is not None and offer["fetching"]:
                if offer["bytes_done"] != last_progress:
                    quiet_since, last_progress = now, offer["bytes_done"]
                waited, limit = now - quiet_since, self.job["stall_timeout_s"]
                why = f"its fetch made no progress for {limit} s"
            else:
                waited, limit = now - quiet_since, PEER_GRACE_S if why == "absent" else 0
                why = {"absent": f"it held no job of this commit for {limit} s",
                       None: "it has nothing more of this commit"}.get(why, why)
            if waited >= limit:
                peers.pop(0)
                log(f"peer {peer} left: {why}; {self.next_source(peers)}")
                quiet_since, last_progress = time.monotonic(), None
                continue
            self.report(state="copying", bytes_done=self.bytes_done(), bytes_total=self.total,
                        message=f"waiting for peer {peer}")
            time.sleep(POLL_S)

    @staticmethod
    def next_source(peers: list[str]) -> str:
        return f"next: peer {peers[0]}" if peers else "the Hub fetches the rest"

    def peer_url(self, peer: str, *parts: str) -> str:
        quoted = "/".join(urllib.parse.quote(part) for part in parts)
        return f"{peer.rstrip('/')}/v1/{self.job['commit']}/{quoted}"

    def peer_offer(self, peer: str) -> tuple[dict | None, str | None]:
        """(the peer's offer, None), or (None, "absent") when it holds no job of this commit,
        or (None, why) when it cannot be asked."""
        try:
            with urllib.request.urlopen(self.peer_url(peer, "offer"),
                                        timeout=PEER_READ_TIMEOUT_S) as response:
                return json.load(response), None
        except urllib.error.HTTPError as error:
            return None, "absent" if error.code == 404 else f"it answered {error.code}"
        except (OSError, ValueError, http.client.HTTPException) as error:
            return None, f"unreachable ({error})"

    def copy_from(self, peer: str, paths: list[str]) -> bool:
        """Copy ``paths`` from ``peer`` in parallel, reporting progress; False if any failed."""
        workers = max(1, min(self.job["max_workers"], len(paths)))
        with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
            futures = [pool.submit(self.copy_file, peer, path) for path in paths]
            while not all(future.done() for future in futures):
                time.sleep(POLL_S)
                now, done = time.monotonic(), self.bytes_done()
                self.report(state="copying", bytes_done=done, bytes_total=self.total,
                            rate_bytes_per_s=self.rate(now, done), message=f"from peer {peer}")
            return all(future.result() for future in futures)

    def copy_file(self, peer: str, path: str) -> bool:
        """One file from ``peer``, hashed as it arrives and moved into place only if it has the
        Hub's checksum; its partial copy is removed whatever happens."""
        want = self.files[path]
        partial = self.client_records / f"{path}.peer{self.incomplete_glob.lstrip('*')}"
        partial.parent.mkdir(parents=True, exist_ok=True)
        digest, size = new_digest(want), 0
        try:
            with urllib.request.urlopen(self.peer_url(peer, "files", path),
                                        timeout=PEER_READ_TIMEOUT_S) as response, \
                    open(partial, "wb") as out:
                while (block := response.read(BLOCK)) and not self.stopping:
                    digest.update(block)
                    out.write(block)
                    size += len(block)
        except (OSError, http.client.HTTPException) as error:
            partial.unlink(missing_ok=True)
            if getattr(error, "errno", None) == errno.ENOSPC:
                self.no_space = True
            log(f"{path} from peer {peer}: {error}")
            return False
        if size != want["size"] or digest.hexdigest() != expected_checksum(want):
            partial.unlink(missing_ok=True)
            if not self.stopping:
                log(f"{path} from peer {peer}: {size} bytes, checksum {digest.hexdigest()}; "
                    f"the Hub lists {want['size']} bytes, {expected_checksum(want)}")
            return False
        target = self.local_dir / path
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(partial, target)
        self.record(path, manifest_entry(target.stat(), expected_checksum(want)))
        return True

    # --- the two modes --------------------------------------------------------------------

    def fetch(self) -> int:
        self.local_dir.mkdir(parents=True, exist_ok=True)
        self.remove_undeclared()
        present = [path for path in self.files
                   if path not in self.verified and (self.local_dir / path).exists()]
        # Files changed since they were verified (or never verified): check them before the
        # client, which trusts its own metadata and would keep a corrupt file.
        if present:
            self.check(present, "verifying")
        self.from_peers()
        if self.no_space and self.out_of_space():
            return 1
        if all(path in self.verified for path in self.files):
            return self.succeeded()
        xet = bool(self.job["xet"])
        outcomes = []
        for number in range(1, self.job["attempts"] + 1):
            if self.stopping:
                break
            outcome = self.attempt(number, xet)
            outcomes.append(outcome)
            if outcome != "exited 0":
                # The next attempt would remove them first anyway; now, they may be what
                # fills the disk that the manifest is written to next.
                self.remove_incomplete()
            if outcome == "stalled":
                xet = False  # reported upstream: Xet hangs on large downloads
            self.forget_rewritten()
            unverified = [path for path in self.files if path not in self.verified]
            missing, corrupt = self.check(unverified, "verifying")
            if not missing and not corrupt:
                return self.succeeded()
            log(f"after attempt {number} ({outcome}): {len(missing)} missing, "
                f"{len(corrupt)} corrupt: {', '.join((missing + corrupt)[:5])}")
            self.report(missing=missing, corrupt=corrupt)
            if self.out_of_space():
                return 1  # another attempt would fail the same way
        return self.failed(outcomes)

    def out_of_space(self) -> bool:
        """When the folder's filesystem cannot hold what is still to fetch (it filled during
        the download: another writer, a log, a second model), fail saying so: retrying only
        fills it again. Partial files are gone by now; complete, verified ones stay (the
        manifest keeps them, so the next run fetches only the rest)."""
        needed = self.total - self.bytes_done()
        free = shutil.disk_usage(self.local_dir).free
        if free >= needed:
            return False
        message = (f"no space left for {self.job['repo']}@{self.job['commit'][:12]}: the "
                   f"filesystem of {self.local_dir} has {free / 1e9:.3f} GB free, "
                   f"{needed / 1e9:.3f} GB still to fetch; partial files removed, complete "
                   "ones kept. Free space (or move weights_dir) and deploy again")
        log(message)
        self.report(state="failed", message=message)
        return True

    def succeeded(self) -> int:
        self.remove_incomplete()
        self.save_manifest(complete=True)
        self.report(state="done", bytes_done=self.total, bytes_total=self.total,
                    message=f"{len(self.files)} files verified")
        log(f"{self.job['repo']}@{self.job['commit']}: {len(self.files)} files, "
            f"{self.total} bytes, verified")
        return 0

    def failed(self, outcomes: list[str]) -> int:
        self.remove_incomplete()
        stalls = outcomes.count("stalled")
        why = (f"no progress for {self.job['stall_timeout_s']} s in {stalls} of "
               f"{len(outcomes)} attempts" if stalls else
               f"hf download {', '.join(outcomes)}")
        self.report(state="failed", message=f"{self.job['repo']}@{self.job['commit'][:12]} "
                    f"incomplete after {len(outcomes)} attempts ({why}); see "
                    f"journalctl -u {self.job.get('unit', 'the unit')}")
        return 1

    def verify(self) -> int:
        self.verified.clear()
        missing, corrupt = self.check(list(self.files), "verifying")
        extra = self.extra_files()
        complete = not missing and not corrupt
        self.save_manifest(complete=complete)
        message = (f"{len(self.files) - len(missing) - len(corrupt)} of {len(self.files)} files "
                   f"match the Hub's checksums; {len(missing)} missing, {len(corrupt)} corrupt "
                   f"(deleted: the next deploy fetches them), {len(extra)} extra")
        log(message)
        self.report(state="done" if complete else "failed", missing=missing, corrupt=corrupt,
                    extra=extra, message=message, bytes_done=self.total, bytes_total=self.total)
        return 0 if complete else 1


    def audit(self) -> int:
        """The scheduled deep verify: every file re-hashed, none deleted (module docstring)."""
        self.verified.clear()
        missing, corrupt, todo = self.triage(list(self.files))
        corrupt = sorted(corrupt + self.hash_files(todo, "verifying"))
        extra = self.extra_files()
        complete = not missing and not corrupt
        # Only the files that matched stay in the manifest: the deploy fetches the others.
        self.save_manifest(complete=complete)
        message = (f"{len(self.files) - len(missing) - len(corrupt)} of {len(self.files)} files "
                   f"match the Hub's checksums; {len(missing)} missing, {len(corrupt)} corrupt"
                   f"{'' if complete else ' (kept: the next deploy fetches them again)'}, "
                   f"{len(extra)} extra")
        log(message)
        for key, paths in (("missing", missing), ("corrupt", corrupt)):
            if paths:
                log(f"{key}: {', '.join(paths)}")
        self.report(state="done" if complete else "failed", missing=missing, corrupt=corrupt,
                    extra=extra, message=message, bytes_done=self.total, bytes_total=self.total,
                    finished=time.time())
        return 0 if complete else 1


# --- serving peers ----------------------------------------------------------------------------

class PeerHandler(BaseHTTPRequestHandler):
    """GET /v1/COMMIT/offer and /v1/COMMIT/files/PATH (module docstring); nothing else."""

    protocol_version = "HTTP/1.1"
    server: "PeerServer"

    def do_GET(self) -> None:
        parts = urllib.parse.urlsplit(self.path).path.split("/", 4)
        if len(parts) < 4 or parts[:2] != ["", "v1"] or parts[3] not in ("offer", "files"):
            return self.answer(404, {"error": "unknown route"})
        folder, job_written = self.server.folder(parts[2])
        if folder is None:
            return self.answer(404, {"error": f"no job of commit {parts[2]}"})
        offer = folder.offer(job_written)
        if parts[3] == "offer":
            return self.answer(200, offer)
        path = urllib.parse.unquote(parts[4]) if len(parts) == 5 else ""
        if path not in offer["files"]:
            return self.answer(404, {"error": f"{path} is not verified here"})
        self.send_file(folder.local_dir / path, folder.verified[path]["size"], path)

    def send_file(self, disk_path: Path, size: int, path: str) -> None:
        try:
            handle = open(disk_path, "rb")
        except OSError as error:
            return self.answer(404, {"error": str(error)})
        with handle:
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(size))
            self.end_headers()
            sent = 0
            while sent < size and (block := handle.read(min(BLOCK, size - sent))):
                self.wfile.write(block)
                sent += len(block)
        log(f"sent {path} ({sent} bytes) to {self.client_address[0]}")

    def answer(self, code: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args) -> None:
        pass  # offers are asked every second by every copying peer; sent files are logged


class PeerServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], job_files: list[Path]):
        super().__init__(address, PeerHandler)
        self.job_files = job_files

    def folder(self, commit: str) -> tuple["Fetch | None", float]:
        """The folder whose job (as the deploy last wrote it) fetches ``commit``, and when
        that job was written."""
        for job_file in self.job_files:
            try:
                job, written = read_job(job_file), job_file.stat().st_mtime
            except (OSError, ValueError, SystemExit):
                continue  # not pushed yet, or being replaced
            if job.get("commit") == commit:
                return Fetch(job), written
        return None, 0.0


def serve(listen: str, job_files: list[Path]) -> int:
    address, _, port = listen.rpartition(":")
    server = PeerServer((address.strip("[]"), int(port)), job_files)
    log(f"serving verified weights of {', '.join(map(str, job_files))} on "
        f"{server.server_address[0]}:{server.server_address[1]}")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        server.serve_forever()
    finally:
        server.server_close()
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--job", type=Path, required=True, action="append")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--verify", action="store_true")
    mode.add_argument("--audit", type=Path, metavar="STATUS.json")
    mode.add_argument("--serve", metavar="ADDR:PORT")
    args = parser.parse_args()
    if args.serve:
        return serve(args.serve, args.job)
    if len(args.job) > 1:
        parser.error("one --job, except with --serve")
    job = read_job(args.job[0])
    state_dir = Path(job["state_dir"])
    state_dir.mkdir(parents=True, exist_ok=True)
    lock_path = state_dir / job["paths"]["lock_file"]
    lock = open(lock_path, "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        log(f"another fetch holds {lock_path}"
            f"{': this scheduled verify is skipped' if args.audit else ''}")
        return LOCKED
    fetch = Fetch(job, status_file=args.audit)

    def terminate(*_):
        fetch.stopping = True
        fetch.stop_child()
        fetch.remove_incomplete()
        fetch.report(state="failed", message="stopped by SIGTERM")
        sys.exit(143)

    signal.signal(signal.SIGTERM, terminate)
    if args.audit:
        return fetch.audit()
    return fetch.verify() if args.verify else fetch.fetch()


if __name__ == "__main__":
    sys.exit(main())
