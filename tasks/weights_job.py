"""The job: what the deploy (tasks/weights.py) tells the host-side script (files/weights-fetch.py),
and every path the two share, defined once.

The deploy writes one Job per weights folder, as JSON, to <state folder>/job.json. The script runs
under the hf venv's python with nothing of this repository, so the job is all it knows: the
fields of Job, and under "paths" the names (Paths) of every file it reads or writes, relative to
the weights folder or to the state folder.

The script reports back in two files. <state folder>/status.json, replaced atomically every
second, which tasks/weights.py follows:

    {"state": "starting" | "fetching" | "verifying" | "done" | "failed", "attempt", "attempts",
     "bytes_done", "bytes_total", "rate_bytes_per_s", "message", "missing", "corrupt", "extra",
     "repo", "commit", "pid", "updated"}

and, once every file of the listing has its Hub checksum, <weights folder>/MANIFEST:

    {"repo", "commit", "complete": true, "files": {PATH: {"size", "mtime_ns", "checksum"}}}

which is how a later deploy (tasks.facts.WeightsTree) knows, from sizes and mtimes alone, that
nothing needs fetching.

Standard library only: tasks/facts.py imports it, and tasks/facts.py is imported by everything.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

# ---- on the host, outside any weights folder -----------------------------------------------

HOST_SCRIPT = "/usr/local/lib/weights-fetch/weights-fetch.py"
# One state folder per weights folder: <STATE_ROOT>/<its slug> (tasks.weights.Target).
STATE_ROOT = "/var/lib/weights-fetch"
# Root-only; the client reads it itself (HF_TOKEN_PATH), so the token is never in argv or env.
TOKEN_FILE = "/etc/weights-fetch/hf-token"

# ---- inside a weights folder, relative to it -----------------------------------------------

# The downloaders' own records: vLLM never reads them, the deploy never counts them as files
# nobody declared (tasks.operations.DOWNLOADER_RECORDS is this folder).
RECORDS_DIR = ".cache"
MANIFEST = f"{RECORDS_DIR}/weights-manifest.json"
# The hf client's per-file metadata and the `*.incomplete` temp files it never resumes.
CLIENT_RECORDS_DIR = f"{RECORDS_DIR}/huggingface/download"
INCOMPLETE_GLOB = "*.incomplete"

# ---- inside a fetch's state folder, relative to it ------------------------------------------

JOB_FILE = "job.json"
STATUS_FILE = "status.json"
LOCK_FILE = "lock"  # one script per state folder at a time
HF_HOME = "hf-home"  # the client's HF_HOME: nothing of root's own Hub cache or settings
NO_TOKEN_FILE = "no-token"  # HF_TOKEN_PATH without a token: never created, so no token is sent
# The scheduled deep verify's status (weights-fetch.py --audit), beside the fetch's: same schema,
# plus "finished" (epoch seconds). tasks/weights.py names it on the script's command line.
AUDIT_FILE = "last-verify.json"


@dataclass(frozen=True)
class Paths:
    """The names the script needs, as the job carries them under "paths"."""

    manifest: str = MANIFEST  # in the weights folder
    records_dir: str = RECORDS_DIR
    client_records_dir: str = CLIENT_RECORDS_DIR
    incomplete_glob: str = INCOMPLETE_GLOB
    status_file: str = STATUS_FILE  # in the state folder
    lock_file: str = LOCK_FILE
    hf_home: str = HF_HOME
    no_token_file: str = NO_TOKEN_FILE


@dataclass(frozen=True)
class Job:
    """One fetch (or, with --verify, one check) of one repo at one commit into one folder. No
    secrets: the token travels as the path of a root-only file."""

    repo: str  # Hub repo id, "moonshotai/Kimi-K2.6"
    commit: str  # the commit the revision resolved to: what `hf download --revision` gets
    local_dir: str  # the weights folder
    state_dir: str  # this folder's job, status, lock and client home
    unit: str  # the transient systemd unit running the script (named in its failure message)
    endpoint: str | None  # a mirror's base URL; None: the Hub
    include: list[str]  # `hf download --include` patterns
    exclude: list[str]  # `hf download --exclude` patterns
    max_workers: int  # `hf download --max-workers`
    xet: bool  # start with Xet on (the script turns it off after a stall)
    stall_timeout_s: int  # the watchdog: an attempt without a new byte this long is stopped
    attempts: int  # client runs before the fetch fails
    token_file: str | None  # TOKEN_FILE, or None without a token
    hf: str  # the pinned `hf` CLI
    files: dict  # the Hub's listing: PATH -> {"size": N, "sha256": HEX | None, "git_sha1": HEX}
    # Hosts to copy from before the Hub, in order, as base URLs of their `--serve`
    # (weights_peer_copy); empty: the Hub only.
    peers: list = field(default_factory=list)
    paths: dict = field(default_factory=lambda: asdict(Paths()))

    def to_json(self) -> bytes:
        """The bytes of job.json: the same job always gives the same bytes (and sha256), which
        is how the deploy recognises a unit that already runs it."""
        return json.dumps(asdict(self), indent=1, sort_keys=True).encode()
