"""Serve local folders as Hugging Face Hub model repos, so the real `hf` CLI downloads offline.

    hub-mirror --listen ADDR:PORT --repo OWNER/NAME=DIR [--repo ...] [--state-file F]
               [--token-file F] [--hash-cache F]
    hub-mirror --print-revisions --repo OWNER/NAME=DIR [--repo ...] [--hash-cache F]

Point a client at it with HF_ENDPOINT=http://ADDR:PORT; `hf download OWNER/NAME --revision SHA`
then works with no internet. Each folder is one repo at one commit: SHA is the sha1 of the
sorted (path, sha256) manifest of its files, so the same bytes always give the same SHA, whatever
the repo is called; the repo answers to that SHA and to "main". --print-revisions prints
"OWNER/NAME SHA" per repo and exits (to pin a revision before serving).

What the client needs, and gets: repo info, the recursive tree listing (git blob ids, LFS sha256
and sizes), HEAD/GET of /resolve/ with X-Repo-Commit, ETag, X-Linked-Etag/-Size and byte ranges,
and the Hub's error codes (RepoNotFound 401, RevisionNotFound 404, EntryNotFound 404). No
X-Xet-Hash is ever sent, so the client downloads over plain HTTP. *.safetensors, *.bin, *.pt,
*.gguf and files over 10 MB are served as LFS files, like the Hub stores them.

Files are hashed once at start (--hash-cache F keeps the hashes across restarts, keyed by path,
size and mtime); a file that changes afterwards is refused with 500 until a restart. Port 0
picks a free port; --state-file F receives {"pid", "url"} once the server listens, and is
removed when it stops (SIGTERM or SIGINT). --token-file F makes every repo require
`Authorization: Bearer <token>` (missing or wrong: 401 RepoNotFound, as the Hub answers for
private and gated repos); the token is never logged. One line per request goes to stderr.

For tests (they also need the token when one is set):
    GET  /_mirror/stats          {"bytes_sent": {"OWNER/NAME/FILE": n}, "requests": [...]}
    POST /_mirror/stats/reset
    POST /_mirror/faults         {"path": "OWNER/NAME/FILE", "drop_after_bytes": N, "times": K}
                                 {"path": ..., "reset_after_bytes": N, "times": K}  (TCP RST)
                                 {"path": ..., "stall_after_bytes": N, "stall_seconds": S,
                                  "times": K, "trickle": false}
    GET|DELETE /_mirror/faults   list | clear the faults (a clear also ends the stalls under way)
A fault acts on the next K GETs of that file whose body goes past N bytes: it closes the
connection (or resets it, or stops sending for S seconds) after N bytes of that response's body.
A stall with "trickle" sends one byte a second meanwhile: a slow mirror, which neither the
client's read timeout nor a stall watchdog ends, until S seconds pass or the faults are cleared.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import hashlib
import hmac
import ipaddress
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

BLOCK_SIZE = 1024 * 1024
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")
LFS_MIN_SIZE = 10 * 1000 * 1000
# Download metadata that `hf download --local-dir` leaves in a folder, and git's own store: a
# folder fetched once and served again must look like the repo it came from.
IGNORED_DIRECTORIES = {(".git",), (".cache", "huggingface")}
# Long enough for a client that parks a keep-alive connection between files, short enough that
# vanished clients do not pin threads forever.
SOCKET_TIMEOUT_S = 300
REQUEST_LOG_LENGTH = 10000


def log(message: str) -> None:
    print(f"hub-mirror: {message}", file=sys.stderr, flush=True)


def fail(message: str) -> None:
    print(f"hub-mirror: error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


# --- the repos ------------------------------------------------------------------------------

@dataclass(frozen=True)
class RepoFile:
    path: str                 # inside the repo, "/"-separated
    disk_path: Path
    size: int
    mtime_ns: int
    sha256: str
    git_blob_id: str          # what `git hash-object` says: of the content, or of the LFS pointer
    lfs_pointer_size: int | None  # None for files git stores as they are

    @property
    def is_lfs(self) -> bool:
        return self.lfs_pointer_size is not None

    @property
    def etag(self) -> str:
        return self.sha256 if self.is_lfs else self.git_blob_id


@dataclass
class Repo:
    repo_id: str
    root: Path
    files: dict[str, RepoFile]
    commit: str
    last_modified: str
    directories: set[str] = field(default_factory=set)

    def directory_id(self, directory: str) -> str:
        prefix = f"{directory}/" if directory else ""
        listing = "".join(f"{f.path}\0{f.sha256}\n" for f in sorted(self.files.values(),
                                                                     key=lambda f: f.path)
                          if f.path.startswith(prefix))
        return hashlib.sha1(listing.encode()).hexdigest()


def is_lfs(path: str, size: int) -> bool:
    return path.endswith(LFS_SUFFIXES) or size > LFS_MIN_SIZE


def lfs_pointer(sha256: str, size: int) -> bytes:
    return (f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\n"
            f"size {size}\n").encode()


def git_blob_header(size: int) -> bytes:
    return b"blob %d\0" % size


def hash_file(disk_path: Path, size: int, want_git_blob_id: bool) -> tuple[str, str | None]:
    """sha256 of the content and, for files git stores as they are, their git blob id."""
    sha256 = hashlib.sha256()
    sha1 = hashlib.sha1(git_blob_header(size)) if want_git_blob_id else None
    with open(disk_path, "rb") as handle:
        while block := handle.read(BLOCK_SIZE):
            sha256.update(block)
            if sha1 is not None:
                sha1.update(block)
    return sha256.hexdigest(), (sha1.hexdigest() if sha1 is not None else None)


class HashCache:
    """Hashes already computed, by absolute path, trusted while size and mtime are unchanged: a
    restart of a mirror of hundreds of GB then costs seconds, not a read of every byte."""

    def __init__(self, path: Path | None):
        self.path = path
        self.entries: dict[str, dict] = {}
        self.lock = threading.Lock()
        if path is not None and path.exists():
            try:
                self.entries = json.loads(path.read_text())
            except (OSError, ValueError) as error:
                log(f"ignoring unreadable hash cache {path}: {error}")

    def get(self, disk_path: Path, size: int, mtime_ns: int) -> dict | None:
        with self.lock:
            entry = self.entries.get(str(disk_path.resolve()))
        if entry and (entry.get("size"), entry.get("mtime_ns")) == (size, mtime_ns):
            return entry
        return None

    def put(self, disk_path: Path, entry: dict) -> None:
        with self.lock:
            self.entries[str(disk_path.resolve())] = entry

    def save(self) -> None:
        if self.path is None:
            return
        partial = self.path.with_name(self.path.name + ".partial")
        with self.lock:
            partial.write_text(json.dumps(self.entries, indent=1, sort_keys=True))
        partial.replace(self.path)


def walk(root: Path) -> list[tuple[str, Path]]:
    found = []
    for directory, subdirectories, filenames in os.walk(root):
        relative = Path(directory).relative_to(root).parts
        subdirectories[:] = sorted(name for name in subdirectories
                                   if (*relative, name) not in IGNORED_DIRECTORIES)
        for name in filenames:
            found.append(("/".join((*relative, name)), Path(directory) / name))
    return sorted(found)


def load_repo(repo_id: str, root: Path, cache: HashCache) -> Repo:
    started = time.monotonic()
    entries = walk(root)

    def describe(entry: tuple[str, Path]) -> tuple[RepoFile, bool]:
        path, disk_path = entry
        stat = disk_path.stat()
        lfs = is_lfs(path, stat.st_size)
        cached = cache.get(disk_path, stat.st_size, stat.st_mtime_ns)
        hit = cached is not None and (lfs or cached.get("git_blob_id"))
        if hit:
            sha256, content_blob_id = cached["sha256"], cached.get("git_blob_id")
        else:
            sha256, content_blob_id = hash_file(disk_path, stat.st_size, not lfs)
            cache.put(disk_path, {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
                                  "sha256": sha256, "git_blob_id": content_blob_id})
        if lfs:
            pointer = lfs_pointer(sha256, stat.st_size)
            blob_id = hashlib.sha1(git_blob_header(len(pointer)) + pointer).hexdigest()
            pointer_size = len(pointer)
        else:
            blob_id, pointer_size = content_blob_id, None
        return RepoFile(path, disk_path, stat.st_size, stat.st_mtime_ns, sha256, blob_id,
                        pointer_size), bool(hit)

    # hashlib releases the GIL on large blocks, so shards hash in parallel on many-core hosts.
    workers = max(1, min(8, os.cpu_count() or 1))
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        described = list(pool.map(describe, entries))
    files = {repo_file.path: repo_file for repo_file, _ in described}
    if not files:
        fail(f"{repo_id}: {root} holds no files")
    manifest = "".join(f"{path}\0{files[path].sha256}\n" for path in sorted(files))
    commit = hashlib.sha1(manifest.encode()).hexdigest()
    newest = max(f.mtime_ns for f in files.values()) / 1e9
    last_modified = datetime.fromtimestamp(newest, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")
    directories = {"/".join(path.split("/")[:depth]) for path in files
                   for depth in range(1, path.count("/") + 1)}
    total = sum(f.size for f in files.values())
    from_cache = sum(1 for _, hit in described if hit)
    log(f"{repo_id}: {len(files)} files, {total} bytes, commit {commit} "
        f"(hashed in {time.monotonic() - started:.1f}s, {from_cache} from the hash cache)")
    return Repo(repo_id, root, files, commit, last_modified, directories)


# --- accounting and faults ------------------------------------------------------------------

class Stats:
    def __init__(self):
        self.lock = threading.Lock()
        self.bytes_sent: dict[str, int] = collections.defaultdict(int)
        self.requests: collections.deque = collections.deque(maxlen=REQUEST_LOG_LENGTH)

    def count_bytes(self, key: str, count: int) -> None:
        with self.lock:
            self.bytes_sent[key] += count

    def record(self, entry: dict) -> None:
        with self.lock:
            self.requests.append(entry)

    def snapshot(self) -> dict:
        with self.lock:
            return {"bytes_sent": dict(self.bytes_sent), "requests": list(self.requests)}

    def reset(self) -> None:
        with self.lock:
            self.bytes_sent.clear()
            self.requests.clear()


FAULT_KINDS = ("drop_after_bytes", "reset_after_bytes", "stall_after_bytes")


@dataclass
class Fault:
    path: str
    kind: str
    after_bytes: int
    times: int
    stall_seconds: float = 0.0
    trickle: bool = False
    released: threading.Event = field(default_factory=threading.Event, compare=False,
                                      repr=False)

    def describe(self) -> dict:
        described = {"path": self.path, self.kind: self.after_bytes, "times": self.times}
        if self.kind == "stall_after_bytes":
            described.update(stall_seconds=self.stall_seconds, trickle=self.trickle)
        return described


class Faults:
    def __init__(self):
        self.lock = threading.Lock()
        self.pending: list[Fault] = []
        self.added: list[Fault] = []  # claimed ones too: a clear ends their stalls

    @staticmethod
    def parse(body: dict) -> Fault:
        if not isinstance(body, dict) or not isinstance(body.get("path"), str):
            raise ValueError('a fault is a JSON object with a "path": "OWNER/NAME/FILE"')
        kinds = [kind for kind in FAULT_KINDS if kind in body]
        if len(kinds) != 1:
            raise ValueError(f"a fault needs exactly one of {', '.join(FAULT_KINDS)}")
        kind = kinds[0]
        after_bytes, times = body[kind], body.get("times", 1)
        seconds = body.get("stall_seconds", 0.0)
        if not isinstance(after_bytes, int) or after_bytes < 0:
            raise ValueError(f"{kind} must be a non-negative integer")
        if not isinstance(times, int) or times < 1:
            raise ValueError("times must be a positive integer")
        if kind == "stall_after_bytes" and (not isinstance(seconds, (int, float)) or seconds <= 0):
            raise ValueError("stall_after_bytes needs stall_seconds > 0")
        if not isinstance(body.get("trickle", False), bool):
            raise ValueError("trickle must be true or false")
        return Fault(body["path"], kind, after_bytes, times, float(seconds),
                     body.get("trickle", False))

    def add(self, fault: Fault) -> None:
        with self.lock:
            self.pending.append(fault)
            self.added.append(fault)

    def clear(self) -> None:
        with self.lock:
            for fault in self.added:
                fault.released.set()
            self.pending.clear()
            self.added.clear()

    def describe(self) -> list[dict]:
        with self.lock:
            return [fault.describe() for fault in self.pending]

    def claim(self, path: str, body_length: int) -> Fault | None:
        """The fault this response will suffer, if any: only one that will actually fire
        counts against its `times`, so "times": 2 means two broken responses."""
        with self.lock:
            for fault in self.pending:
                if fault.path == path and fault.after_bytes < body_length:
                    fault.times -= 1
                    if fault.times == 0:
                        self.pending.remove(fault)
                    return fault
        return None


# --- HTTP -----------------------------------------------------------------------------------

class HubError(Exception):
    def __init__(self, status: int, message: str, error_code: str | None = None,
                 commit: str | None = None):
        super().__init__(message)
        self.status, self.message, self.error_code, self.commit = status, message, error_code, commit


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """(first, last) byte of a single `bytes=` range, None to send the whole file; HubError 416
    for a range that starts past the end. Several ranges at once are answered in full, which
    HTTP allows and the Hub client never asks for."""
    if not header or not header.startswith("bytes=") or "," in header:
        return None
    first_text, _, last_text = header[len("bytes="):].strip().partition("-")
    try:
        if first_text == "":
            suffix = int(last_text)
            if suffix <= 0:
                return None
            return max(0, size - suffix), size - 1
        first = int(first_text)
        last = int(last_text) if last_text else size - 1
    except ValueError:
        return None
    if first >= size:
        raise HubError(416, f"range starts at byte {first}, the file has {size}")
    if last < first:
        return None
    return first, min(last, size - 1)


class MirrorServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], repos: dict[str, Repo], token: str | None):
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.repos = repos
        self.token = token
        self.stats = Stats()
        self.faults = Faults()
        self.stopping = threading.Event()
        self.sockets_to_reset: set[socket.socket] = set()
        super().__init__(address, MirrorHandler)

    def shutdown_request(self, request) -> None:
        # The usual half-close would send a FIN before the RST a reset fault asked for.
        if request in self.sockets_to_reset:
            self.sockets_to_reset.discard(request)
            self.close_request(request)
            return
        super().shutdown_request(request)

    def handle_error(self, request, client_address) -> None:
        error = sys.exc_info()[1]
        log(f"{client_address[0]} connection error: {error.__class__.__name__}: {error}")


class MirrorHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "hub-mirror"
    timeout = SOCKET_TIMEOUT_S
    server: MirrorServer

    def do_GET(self) -> None:
        self.dispatch()

    def do_HEAD(self) -> None:
        self.dispatch()

    def do_POST(self) -> None:
        self.dispatch()

    def do_DELETE(self) -> None:
        self.dispatch()

    def do_PUT(self) -> None:
        self.dispatch()

    # BaseHTTPRequestHandler logs on its own; one line per request, written below, is enough.
    def log_request(self, code="-", size="-") -> None:
        pass

    def log_message(self, format: str, *args) -> None:
        log(f"{self.client_address[0]} {format % args}")

    def dispatch(self) -> None:
        started = time.monotonic()
        self.status = 0
        self.body_sent = 0
        self.request_body = self.read_request_body()
        route = urlsplit(self.path)
        try:
            if route.path == "/_mirror" or route.path.startswith("/_mirror/"):
                self.require_token()
                self.control(route.path)
            elif self.command in ("GET", "HEAD"):
                self.hub(route.path, parse_qs(route.query))
            else:
                raise HubError(405, f"{self.command} is not supported here")
        except HubError as error:
            self.send_error_json(error)
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            # The client went away mid-body; nothing more can be said to it.
            self.close_connection = True
        finally:
            self.finish_request_log(started)

    def finish_request_log(self, started: float) -> None:
        duration = time.monotonic() - started
        self.server.stats.record({"method": self.command, "path": self.path,
                                  "status": self.status, "bytes": self.body_sent,
                                  "range": self.headers.get("Range")})
        log(f"{self.client_address[0]} {self.command} {self.path} {self.status} "
            f"{self.body_sent} {duration:.3f}s")

    def read_request_body(self) -> bytes:
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = 0
            self.close_connection = True  # where this request ends is anyone's guess
        return self.rfile.read(length) if length > 0 else b""

    # --- plumbing ---------------------------------------------------------------------------

    def start_response(self, status: int, headers: dict[str, str | int]) -> None:
        self.status = status
        self.send_response(status)
        for name, value in headers.items():
            # Headers are Latin-1 on the wire; a message naming a non-ASCII file must not crash.
            self.send_header(name, str(value).encode("ascii", "backslashreplace").decode())
        self.end_headers()

    def send_json(self, value, status: int = 200, headers: dict | None = None) -> None:
        body = json.dumps(value).encode()
        self.start_response(status, {"Content-Type": "application/json",
                                     "Content-Length": len(body), **(headers or {})})
        if self.command != "HEAD":
            self.wfile.write(body)
            self.body_sent = len(body)

    def send_error_json(self, error: HubError) -> None:
        headers = {"X-Error-Message": error.message}
        if error.error_code:
            headers["X-Error-Code"] = error.error_code
        if error.commit:
            headers["X-Repo-Commit"] = error.commit
        self.send_json({"error": error.message}, error.status, headers)

    def require_token(self) -> None:
        expected = self.server.token
        if expected is None:
            return
        offered = self.headers.get("Authorization", "")
        if not hmac.compare_digest(offered.encode(), f"Bearer {expected}".encode()):
            raise HubError(401, "Repository not found, or a valid token is required",
                           "RepoNotFound")

    # --- test controls ----------------------------------------------------------------------

    def control(self, path: str) -> None:
        if path == "/_mirror/stats" and self.command == "GET":
            return self.send_json(self.server.stats.snapshot())
        if path == "/_mirror/stats/reset" and self.command == "POST":
            self.server.stats.reset()
            return self.send_json({"reset": True})
        if path == "/_mirror/faults" and self.command == "GET":
            return self.send_json(self.server.faults.describe())
        if path == "/_mirror/faults" and self.command == "DELETE":
            self.server.faults.clear()
            return self.send_json([])
        if path == "/_mirror/faults" and self.command == "POST":
            try:
                fault = Faults.parse(json.loads(self.request_body or b"null"))
            except ValueError as error:
                raise HubError(400, f"bad fault: {error}") from None
            self.server.faults.add(fault)
            return self.send_json(self.server.faults.describe())
        raise HubError(404, f"no control {self.command} {path}")

    # --- the Hub's API ----------------------------------------------------------------------

    def hub(self, path: str, query: dict[str, list[str]]) -> None:
        # Split before unquoting: the client quotes "/" inside revisions and tree paths.
        segments = path.split("/")[1:]
        if len(segments) >= 4 and segments[:2] == ["api", "models"]:
            repo = self.find_repo(segments[2], segments[3])
            rest = segments[4:]
            if not rest:
                return self.send_json(self.repo_info(repo, "main", query))
            if len(rest) == 2 and rest[0] == "revision":
                return self.send_json(self.repo_info(repo, unquote(rest[1]), query))
            if len(rest) >= 2 and rest[0] == "tree":
                commit = self.resolve_revision(repo, unquote(rest[1]))
                directory = unquote("/".join(rest[2:])).strip("/")
                recursive = query.get("recursive", ["false"])[0].lower() in ("true", "1")
                return self.send_json(self.tree(repo, commit, directory, recursive))
        elif len(segments) >= 5 and segments[2] == "resolve":
            repo = self.find_repo(segments[0], segments[1])
            commit = self.resolve_revision(repo, unquote(segments[3]))
            return self.resolve(repo, commit, unquote("/".join(segments[4:])))
        raise HubError(404, f"not found: {path}")

    def find_repo(self, owner: str, name: str) -> Repo:
        repo_id = f"{unquote(owner)}/{unquote(name)}"
        # A missing repo and a refused token answer alike, as on the Hub: neither tells a
        # caller without the token which repos exist.
        self.require_token()
        if repo_id not in self.server.repos:
            raise HubError(401, f"Repository {repo_id} not found", "RepoNotFound")
        return self.server.repos[repo_id]

    @staticmethod
    def resolve_revision(repo: Repo, revision: str) -> str:
        if revision in ("main", repo.commit):
            return repo.commit
        raise HubError(404, f"Invalid rev id: {revision} (this mirror serves {repo.repo_id} at "
                       f"main = {repo.commit} only)", "RevisionNotFound")

    def repo_info(self, repo: Repo, revision: str, query: dict[str, list[str]]) -> dict:
        commit = self.resolve_revision(repo, revision)
        with_blobs = query.get("blobs", ["false"])[0].lower() in ("true", "1")
        siblings = []
        for repo_file in sorted(repo.files.values(), key=lambda f: f.path):
            sibling = {"rfilename": repo_file.path}
            if with_blobs:
                sibling.update(size=repo_file.size, blobId=repo_file.git_blob_id)
                if repo_file.is_lfs:
                    sibling["lfs"] = {"sha256": repo_file.sha256, "size": repo_file.size,
                                      "pointerSize": repo_file.lfs_pointer_size}
            siblings.append(sibling)
        owner = repo.repo_id.split("/")[0]
        return {"_id": commit[:24], "id": repo.repo_id, "modelId": repo.repo_id, "author": owner,
                "sha": commit, "lastModified": repo.last_modified, "createdAt": repo.last_modified,
                "private": self.server.token is not None, "gated": False, "disabled": False,
                "downloads": 0, "likes": 0, "tags": [], "siblings": siblings,
                "usedStorage": sum(f.size for f in repo.files.values())}

    def tree(self, repo: Repo, commit: str, directory: str, recursive: bool) -> list[dict]:
        if directory and directory not in repo.directories:
            raise HubError(404, f"{directory} is not a folder in {repo.repo_id}", "EntryNotFound",
                           commit)
        prefix = f"{directory}/" if directory else ""

        def wanted(path: str) -> bool:
            return path.startswith(prefix) and (recursive or "/" not in path[len(prefix):])

        entries = [{"type": "directory", "oid": repo.directory_id(path), "size": 0, "path": path}
                   for path in sorted(repo.directories) if wanted(path)]
        for repo_file in sorted(repo.files.values(), key=lambda f: f.path):
            if not wanted(repo_file.path):
                continue
            entry = {"type": "file", "oid": repo_file.git_blob_id, "size": repo_file.size,
                     "path": repo_file.path}
            if repo_file.is_lfs:
                entry["lfs"] = {"oid": repo_file.sha256, "size": repo_file.size,
                                "pointerSize": repo_file.lfs_pointer_size}
            entries.append(entry)
        return entries

    def resolve(self, repo: Repo, commit: str, path: str) -> None:
        repo_file = repo.files.get(path)
        if repo_file is None:
            raise HubError(404, f"{path} does not exist in {repo.repo_id} at {commit}",
                           "EntryNotFound", commit)
        try:
            stat = repo_file.disk_path.stat()
        except OSError as error:
            raise HubError(500, f"{path} cannot be read: {error.strerror}") from None
        if (stat.st_size, stat.st_mtime_ns) != (repo_file.size, repo_file.mtime_ns):
            raise HubError(500, f"{path} changed on disk since the mirror hashed it; restart "
                           "the mirror to serve the new content")
        byte_range = parse_range(self.headers.get("Range"), repo_file.size)
        first, last = byte_range if byte_range else (0, repo_file.size - 1)
        length = last - first + 1
        headers = {"Content-Type": "application/octet-stream", "Content-Length": length,
                   "Accept-Ranges": "bytes", "X-Repo-Commit": commit,
                   "ETag": f'"{repo_file.etag}"'}
        if repo_file.is_lfs:
            headers["X-Linked-Etag"] = f'"{repo_file.sha256}"'
            headers["X-Linked-Size"] = repo_file.size
        if byte_range:
            headers["Content-Range"] = f"bytes {first}-{last}/{repo_file.size}"
        with open(repo_file.disk_path, "rb") as handle:
            self.start_response(206 if byte_range else 200, headers)
            if self.command == "GET" and length > 0:
                self.send_file(handle, first, length, f"{repo.repo_id}/{path}")

    def stalled(self, fault: Fault, handle, offset: int, left: int, key: str) -> int:
        """Wait out a stall: its seconds, a clear of the faults or the mirror stopping,
        whichever comes first; with "trickle", a byte a second meanwhile (never the last
        one). Returns the bytes sent."""
        deadline, sent = time.monotonic() + fault.stall_seconds, 0
        while not (fault.released.is_set() or self.server.stopping.is_set()):
            now = time.monotonic()
            if now >= deadline:
                break
            if fault.released.wait(min(1.0, deadline - now)):
                break
            if fault.trickle and sent < left - 1:
                written = self.connection.sendfile(handle, offset + sent, 1)
                sent += written
                self.server.stats.count_bytes(key, written)
        return sent

    def send_file(self, handle, offset: int, length: int, key: str) -> None:
        fault = self.server.faults.claim(key, length)
        sent = 0
        while sent < length:
            if fault is not None and sent == fault.after_bytes:
                if fault.kind == "stall_after_bytes":
                    log(f"fault: stalling {key} for {fault.stall_seconds}s after {sent} bytes"
                        + (", a byte a second" if fault.trickle else ""))
                    sent += self.stalled(fault, handle, offset + sent, length - sent, key)
                    self.body_sent = sent
                    fault = None
                    continue
                verb = "resetting" if fault.kind == "reset_after_bytes" else "dropping"
                log(f"fault: {verb} {key} after {sent} bytes")
                self.break_connection(reset=fault.kind == "reset_after_bytes")
                return
            count = min(BLOCK_SIZE, length - sent)
            if fault is not None:
                count = min(count, fault.after_bytes - sent)
            written = self.connection.sendfile(handle, offset + sent, count)
            if written == 0:  # the file shrank under us; the stat check makes this rare
                self.close_connection = True
                return
            sent += written
            self.body_sent = sent
            self.server.stats.count_bytes(key, written)

    def break_connection(self, reset: bool) -> None:
        self.close_connection = True
        if reset:
            # Linger 0 turns close() into a TCP RST: what a dead middlebox or peer looks like.
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                       struct.pack("ii", 1, 0))
            self.server.sockets_to_reset.add(self.connection)


# --- the command ----------------------------------------------------------------------------

def parse_listen(value: str) -> tuple[str, int]:
    host, separator, port = value.rpartition(":")
    if not separator or not port.isdigit():
        raise argparse.ArgumentTypeError("expected ADDR:PORT, e.g. 127.0.0.1:0 or [::1]:8080")
    host = host.strip("[]")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{host!r} is not an IP address") from None
    return host, int(port)


def parse_repo(value: str) -> tuple[str, Path]:
    repo_id, separator, directory = value.partition("=")
    parts = repo_id.split("/")
    if not separator or len(parts) != 2 or not all(parts):
        raise argparse.ArgumentTypeError("expected OWNER/NAME=DIR")
    path = Path(directory)
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"{directory} is not a folder")
    return repo_id, path


def read_token(path: str) -> str:
    try:
        token = Path(path).read_text().strip()
    except OSError as error:
        fail(f"cannot read the token file {path}: {error.strerror}")
    if not token:
        fail(f"the token file {path} is empty")
    return token


def url_of(server: MirrorServer) -> str:
    host, port = server.server_address[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def write_state(path: Path, state: dict) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(state) + "\n")
    partial.replace(path)  # readers never see half a file


def launch(work: Path, repos: dict[str, Path], *, listen: str = "127.0.0.1:0",
           hash_cache: Path | None = None, who: str = "hub-mirror",
           start_timeout_s: float = 60) -> tuple[subprocess.Popen, str]:
    """Run hub-mirror in a process of its own serving ``repos`` (id -> folder) on ``listen``,
    its state and log in ``work`` (named after the address); (the process, its base URL) once
    it listens. A mirror that does not start is stopped, and ``who`` fails showing its log."""
    label = listen.rsplit(":", 1)[0]
    state, log_file = work / f"mirror-{label}.json", work / f"mirror-{label}.log"
    state.unlink(missing_ok=True)
    command = [sys.executable, "-m", "harness.hub_mirror", "--listen", listen,
               "--state-file", str(state)]
    if hash_cache is not None:
        command += ["--hash-cache", str(hash_cache)]
    for repo_id, root in repos.items():
        command += ["--repo", f"{repo_id}={root}"]
    with open(log_file, "w") as log:
        mirror = subprocess.Popen(command, cwd=Path(__file__).resolve().parent.parent,
                                  stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    deadline = time.monotonic() + start_timeout_s
    while time.monotonic() < deadline:
        if state.exists():
            return mirror, json.loads(state.read_text())["url"]
        if mirror.poll() is not None:
            break
        time.sleep(0.05)
    stop(mirror)
    raise SystemExit(f"{who}: hub-mirror did not start on {listen}:\n{log_file.read_text()}")


def stop(process: subprocess.Popen) -> None:
    """Stop a mirror launch() started: SIGTERM, then SIGKILL after 10 s."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--listen", type=parse_listen, metavar="ADDR:PORT")
    parser.add_argument("--repo", type=parse_repo, action="append", required=True,
                        metavar="OWNER/NAME=DIR")
    parser.add_argument("--state-file", type=Path)
    parser.add_argument("--token-file")
    parser.add_argument("--hash-cache", type=Path)
    parser.add_argument("--print-revisions", action="store_true")
    args = parser.parse_args(argv)
    if not args.print_revisions and args.listen is None:
        parser.error("--listen ADDR:PORT is required (or --print-revisions)")
    repo_ids = [repo_id for repo_id, _ in args.repo]
    if len(set(repo_ids)) != len(repo_ids):
        parser.error("a repo is named twice")

    token = read_token(args.token_file) if args.token_file else None
    cache = HashCache(args.hash_cache)
    repos = {repo_id: load_repo(repo_id, directory, cache) for repo_id, directory in args.repo}
    cache.save()
    if args.print_revisions:
        for repo in repos.values():
            print(f"{repo.repo_id} {repo.commit}")
        return 0

    stop = threading.Event()
    for signal_number in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signal_number, lambda *_: stop.set())
    try:
        server = MirrorServer(args.listen, repos, token)
    except OSError as error:
        fail(f"cannot listen on {args.listen[0]}:{args.listen[1]}: {error.strerror}")
    url = url_of(server)
    # serve_forever runs in a thread because shutdown() must be called from another one.
    serving = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2},
                               daemon=True)
    serving.start()
    if args.state_file:
        write_state(args.state_file, {"pid": os.getpid(), "url": url})
    log(f"listening on {url}" + (" (token required)" if token else ""))
    try:
        while not stop.wait(1):
            pass
    finally:
        server.stopping.set()  # wakes stalled transfers
        server.shutdown()
        server.server_close()
        if args.state_file:
            args.state_file.unlink(missing_ok=True)
        log("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
