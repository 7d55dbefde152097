"""Model weights in <weights_dir>/<profile local name> on the host: pushed from the controller
(model_source_dir) or fetched from the Hub with the pinned `hf` CLI, verified, never twice."""

from __future__ import annotations

import hashlib
import io
import json
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from pyinfra import host, logger
from pyinfra.api import (FactBase, FileUploadCommand, FunctionCommand, QuoteString, StringCommand,
                         deploy, operation)
from pyinfra.operations import files

from tasks import hf_cli
from tasks.facts import FreeBytes
from tasks.operations import secret_file, tree_synced, undeclared_files
from tasks.settings import REPO, DataError, Settings, resolve

FETCH_SCRIPT = REPO / "files" / "weights-fetch.py"
HOST_SCRIPT = "/usr/local/lib/weights-fetch/weights-fetch.py"
STATE_ROOT = "/var/lib/weights-fetch"
TOKEN_FILE = "/etc/weights-fetch/hf-token"
MANIFEST = ".cache/weights-manifest.json"
INCOMPLETE_DIR = ".cache/huggingface/download"
# How often the deploy asks the host how far the download got, and how often it says so.
POLL_S = 2.0
REPORT_EVERY_S = 10.0


# ---- data keys ----------------------------------------------------------------------------

@dataclass(frozen=True)
class HubSettings:
    endpoint: str | None
    token: str | None
    include: tuple[str, ...]
    exclude: tuple[str, ...]
    max_workers: int
    xet: bool
    stall_timeout_s: int
    attempts: int
    verify_full: bool
    draft_revision: str


def read_hub_settings(host_name: str, data, environ=os.environ) -> HubSettings:
    """This task's own keys (defaults in group_data/all.py)."""
    errors: list[str] = []

    def get(key, check, need):
        value = data.get(key)
        if not check(value):
            errors.append(f"{host_name}: {key} = {value!r}: {need}")
        return value

    def strings(value):
        return isinstance(value, (list, tuple)) and all(isinstance(v, str) and v for v in value)

    def integer(low, high):
        return lambda v: isinstance(v, int) and not isinstance(v, bool) and low <= v <= high

    endpoint = get("weights_hf_endpoint",
                   lambda v: v is None or (isinstance(v, str) and v.startswith(("http://",
                                                                                 "https://"))),
                   "None (the Hub) or a mirror's base URL, http(s)://HOST[:PORT]")
    token_file = get("weights_hf_token_file", lambda v: v is None or isinstance(v, str),
                     "None (HF_TOKEN from the controller's environment) or a controller file")
    token = None
    if isinstance(token_file, str):
        path = Path(os.path.expanduser(token_file))
        if not path.is_absolute():
            path = REPO / path
        path = path.resolve()
        # A token inside the repository is one `git add` away from being published.
        if path == REPO or REPO in path.parents:
            errors.append(f"{host_name}: weights_hf_token_file = {token_file!r}: a file outside "
                          f"this repository (it is inside {REPO})")
        else:
            token = path.read_text().strip() if path.is_file() else ""
            if not token:
                errors.append(f"{host_name}: weights_hf_token_file = {token_file!r}: a readable, "
                              "non-empty file on the controller")
    elif token_file is None:
        token = (environ.get("HF_TOKEN") or "").strip() or None
    include = get("weights_include", strings, "a list of glob patterns")
    exclude = get("weights_exclude", strings, "a list of glob patterns")
    workers = get("weights_max_workers", integer(1, 64), "an integer 1..64")
    xet = get("weights_xet", lambda v: isinstance(v, bool), "true or false")
    stall = get("weights_stall_timeout_s", integer(30, 24 * 3600),
                "seconds, 30..86400 (the client itself waits 10 s per read and retries 5 times; "
                "a day without a byte is a dead transfer)")
    attempts = get("weights_download_attempts", integer(1, 20), "an integer 1..20")
    verify = get("weights_verify_full", lambda v: isinstance(v, bool), "true or false")
    draft_revision = get("model_draft_revision", lambda v: isinstance(v, str) and v,
                         "a commit SHA or tag of model_draft_repo")
    if errors:
        raise DataError("invalid host data:\n  " + "\n  ".join(errors))
    return HubSettings(endpoint=endpoint.rstrip("/") if endpoint else None, token=token,
                       include=tuple(include), exclude=tuple(exclude), max_workers=workers,
                       xet=xet, stall_timeout_s=stall, attempts=attempts, verify_full=verify,
                       draft_revision=draft_revision)


# ---- the Hub's listing, asked from the controller ------------------------------------------

@dataclass(frozen=True)
class Listing:
    """What `hf download` will place: the resolved commit and, per file, size and checksum."""

    repo: str
    revision: str
    commit: str
    files: dict  # path -> {"size": n, "sha256": hex | None, "git_sha1": hex}

    @property
    def total_bytes(self) -> int:
        return sum(f["size"] for f in self.files.values())


class HubLookupError(Exception):
    """The Hub (or mirror) cannot give this repo at this revision; the message says why."""


_listings: dict = {}
_listings_lock = threading.Lock()


def hub_listing(repo: str, revision: str, endpoint: str | None, token: str | None,
                include=(), exclude=()) -> Listing:
    """One metadata request per (endpoint, repo, revision) per run, shared by every host."""
    key = (endpoint, repo, revision, hashlib.sha256((token or "").encode()).hexdigest(),
           tuple(include), tuple(exclude))
    with _listings_lock:
        if key not in _listings:
            try:
                _listings[key] = _fetch_listing(repo, revision, endpoint, token, include, exclude)
            except HubLookupError as error:
                _listings[key] = error
        found = _listings[key]
    if isinstance(found, HubLookupError):
        raise found
    return found


def _fetch_listing(repo, revision, endpoint, token, include, exclude) -> Listing:
    from huggingface_hub import HfApi
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, RepositoryNotFoundError,
                                        RevisionNotFoundError)
    from huggingface_hub.utils import filter_repo_objects

    where = endpoint or "the Hub"
    try:
        info = HfApi(endpoint=endpoint, token=token or False).model_info(
            repo, revision=revision, files_metadata=True, timeout=30)
    except RevisionNotFoundError:
        raise HubLookupError(f"revision {revision!r} not found in {repo} at {where}") from None
    except GatedRepoError:
        raise HubLookupError(f"{repo} at {where} is gated: accept its terms with the account "
                             "whose token weights_hf_token_file names") from None
    except RepositoryNotFoundError:
        raise HubLookupError(f"repo {repo} not found at {where} (or it is private and the "
                             "token is missing or refused)") from None
    except HfHubHTTPError as error:
        status = getattr(error.response, "status_code", "?")
        raise HubLookupError(f"{where} answered HTTP {status} for {repo}@{revision}") from None
    except Exception as error:  # connection refused, DNS, TLS, timeouts: no traceback wanted
        raise HubLookupError(f"cannot reach {where} for {repo}@{revision}: "
                             f"{type(error).__name__}: {error}") from None
    # The same filter `hf download --include/--exclude` applies, so both agree on the files.
    siblings = list(filter_repo_objects(info.siblings or [], allow_patterns=list(include) or None,
                                        ignore_patterns=list(exclude) or None,
                                        key=lambda sibling: sibling.rfilename))
    listed = {}
    for sibling in siblings:
        if sibling.size is None or sibling.blob_id is None:
            raise HubLookupError(f"{where} gave no size or checksum for {repo}/{sibling.rfilename}")
        listed[sibling.rfilename] = {"size": sibling.size, "git_sha1": sibling.blob_id,
                                     "sha256": sibling.lfs.sha256 if sibling.lfs else None}
    if not listed:
        raise HubLookupError(f"{repo}@{revision} at {where}: no file matches weights_include "
                             f"{list(include)} / weights_exclude {list(exclude)}")
    return Listing(repo=repo, revision=revision, commit=info.sha, files=listed)


# ---- what the host holds -------------------------------------------------------------------

_MARK = "::weights-tree::"


class WeightsTree(FactBase):
    """A weights folder as the fetch left it: its manifest, every file's size and mtime, the
    bytes of orphaned `.incomplete` files, and whether a fetch unit is running (and its job).

    .. code:: python

        {"manifest": {"repo": "moonshotai/Kimi-K2.6", "commit": "3f1c...", "complete": True,
                      "files": {"model-00001-of-000064.safetensors": {"size": 9.9e9, ...}}},
         "files": {"model-00001-of-000064.safetensors": [9932891234, 1764413012123456789]},
         "incomplete_bytes": 0, "unit_active": False, "job_sha256": "9e1d..."}

    Reads sizes and mtimes only, never content: a complete 595 GB tree is recognised in well
    under a second. An absent folder yields empty values.
    """

    def command(self, path: str, state_dir: str, unit: str) -> StringCommand:
        d = QuoteString(path)
        return StringCommand(
            "echo", f"{_MARK}manifest;", "cat", QuoteString(f"{path}/{MANIFEST}"), "2>/dev/null;",
            "echo;", "echo", f"{_MARK}files;",
            "find", d, "-path", QuoteString(f"{path}/.cache"), "-prune", "-o", "-type", "f",
            "-printf", QuoteString("%P\\t%s\\t%T@\\n"), "2>/dev/null;",
            "echo", f"{_MARK}incomplete;",
            "find", QuoteString(f"{path}/{INCOMPLETE_DIR}"), "-name", "'*.incomplete'",
            "-type", "f", "-printf", "'%s\\n'", "2>/dev/null;",
            "echo", f"{_MARK}unit;", "systemctl", "is-active", unit, "2>/dev/null;",
            "echo", f"{_MARK}job;", "sha256sum", QuoteString(f"{state_dir}/job.json"),
            "2>/dev/null;", "true",
        )

    def process(self, output: list[str]) -> dict:
        sections: dict[str, list[str]] = {}
        current = None
        for line in output:
            if line.startswith(_MARK):
                current = line[len(_MARK):]
                sections[current] = []
            elif current:
                sections[current].append(line)
        try:
            manifest = json.loads("\n".join(sections.get("manifest", [])) or "null")
        except ValueError:
            manifest = None
        present = {}
        for line in sections.get("files", []):
            parts = line.split("\t")
            if len(parts) == 3 and parts[1].isdigit():
                present[parts[0]] = [int(parts[1]), mtime_ns(parts[2])]
        job = sections.get("job", [""])
        return {
            "manifest": manifest if isinstance(manifest, dict) else None,
            "files": present,
            "incomplete_bytes": sum(int(n) for n in sections.get("incomplete", []) if n.isdigit()),
            "unit_active": sections.get("unit", [""])[:1] in (["active"], ["activating"]),
            "job_sha256": job[0].split()[0] if job and job[0] else None,
        }

    @staticmethod
    def default() -> dict:
        return {"manifest": None, "files": {}, "incomplete_bytes": 0, "unit_active": False,
                "job_sha256": None}


def mtime_ns(text: str) -> int:
    """find's %T@ ("1764413012.1234567890") as st_mtime_ns, exactly (no float rounding)."""
    seconds, _, fraction = text.partition(".")
    return int(seconds) * 10**9 + int((fraction + "000000000")[:9])


def is_complete(listing: Listing, tree: dict) -> bool:
    """True when the manifest vouches for exactly this commit and every file still has the
    size and mtime it had when its checksum was verified."""
    manifest = tree.get("manifest") or {}
    if not (manifest.get("complete") and manifest.get("commit") == listing.commit
            and manifest.get("repo") == listing.repo):
        return False
    verified = manifest.get("files") or {}
    for path, want in listing.files.items():
        entry = verified.get(path)
        checksum = want["sha256"] or want["git_sha1"]
        if not entry or entry.get("checksum") != checksum or entry.get("size") != want["size"]:
            return False
        if tree["files"].get(path) != [entry["size"], entry["mtime_ns"]]:
            return False
    return True


def bytes_to_fetch(listing: Listing, tree: dict) -> int:
    """Bytes the client still has to write: every file not present at its listed size."""
    return sum(want["size"] for path, want in listing.files.items()
               if (tree["files"].get(path) or [None])[0] != want["size"])


def space_problem(host_name: str, local_dir: str, listing: Listing, tree: dict,
                  free: dict | None) -> str | None:
    if not free:
        return None
    needed = bytes_to_fetch(listing, tree)
    # The fetch deletes orphaned .incomplete files before it writes anything.
    available = free["free_bytes"] + tree.get("incomplete_bytes", 0)
    if needed <= available:
        return None
    return (f"{host_name}: weights_dir: {local_dir} (filesystem {free['mount']}) needs "
            f"{needed / 1e9:.2f} GB more for {listing.repo}@{listing.commit[:12]}, "
            f"{available / 1e9:.2f} GB free ({needed} > {available} bytes)")


# ---- the fetch, as operations --------------------------------------------------------------

@dataclass(frozen=True)
class Target:
    label: str  # "model" or "draft"
    repo: str
    revision: str
    local_dir: str

    @property
    def slug(self) -> str:
        # The folder's name for people, a digest of its path so that two weights folders with
        # the same name (a moved weights_dir, a test tree) never share a unit or state.
        digest = hashlib.sha256(self.local_dir.encode()).hexdigest()[:8]
        return f"{Path(self.local_dir).name}-{digest}"

    @property
    def unit(self) -> str:
        return f"weights-fetch-{self.slug}.service"

    @property
    def state_dir(self) -> str:
        return f"{STATE_ROOT}/{self.slug}"


def targets(settings: Settings, hub: HubSettings) -> list[Target]:
    found = [Target("model", settings.profile.repo, settings.model_revision, settings.model_dir)]
    if settings.draft_dir:
        found.append(Target("draft", settings.draft_repo, hub.draft_revision, settings.draft_dir))
    return found


def job_for(target: Target, listing: Listing, hub: HubSettings, python: str) -> dict:
    return {
        "repo": listing.repo, "commit": listing.commit, "local_dir": target.local_dir,
        "state_dir": target.state_dir, "unit": target.unit, "endpoint": hub.endpoint,
        "include": list(hub.include), "exclude": list(hub.exclude),
        "max_workers": hub.max_workers, "xet": hub.xet, "stall_timeout_s": hub.stall_timeout_s,
        "attempts": hub.attempts, "token_file": TOKEN_FILE if hub.token else None,
        "hf": str(Path(python).parent / "hf"), "files": listing.files,
    }


def problems(host_obj, settings: Settings, hub: HubSettings) -> list[str]:
    """Every reason the Hub fetch cannot start on this host, one line each (for the preflight):
    unknown repo or revision, unreachable endpoint, not enough free space."""
    found = []
    for target in targets(settings, hub):
        try:
            listing = hub_listing(target.repo, target.revision, hub.endpoint, hub.token,
                                  hub.include, hub.exclude)
        except HubLookupError as error:
            key = "model_revision" if target.label == "model" else "model_draft_revision"
            found.append(f"{host_obj.name}: {key}: {error}")
            continue
        tree = host_obj.get_fact(WeightsTree, path=target.local_dir, state_dir=target.state_dir,
                                 unit=target.unit)
        if is_complete(listing, tree):
            continue
        problem = space_problem(host_obj.name, target.local_dir, listing, tree,
                                host_obj.get_fact(FreeBytes, path=target.local_dir))
        if problem:
            found.append(problem)
    return found


def _follow(state, host, target: Target, verify: bool) -> bool:
    """Poll the unit's status file until it finishes, logging progress; True when done."""
    status_file = f"{target.state_dir}/status.json"
    what = f"{'verify' if verify else 'fetch'} {target.repo} -> {target.local_dir}"
    last_report, last_state, gone = 0.0, None, 0
    while True:
        ok, output = host.run_shell_command(StringCommand(
            "cat", QuoteString(status_file), "2>/dev/null;", "echo;",
            "systemctl", "is-active", target.unit, "||", "true"))
        lines = output.stdout_lines if ok else []
        active = bool(lines) and lines[-1].strip() in ("active", "activating")
        try:
            status = json.loads("\n".join(lines[:-1])) if len(lines) > 1 else {}
        except ValueError:
            status = {}  # read while being replaced: the next poll gets it
        phase = status.get("state")
        now = time.monotonic()
        if phase != last_state or now - last_report >= REPORT_EVERY_S or not active:
            done, total = status.get("bytes_done", 0), status.get("bytes_total", 0) or 1
            host.log(f"{what}: {phase or 'starting'} {done / 1e9:.2f}/{total / 1e9:.2f} GB "
                     f"({100 * done / total:.0f}%), {status.get('rate_bytes_per_s', 0) / 1e6:.1f}"
                     f" MB/s, attempt {status.get('attempt', 0)}/{status.get('attempts', '?')}")
            last_report, last_state = now, phase
        if not active:
            if phase == "done":
                return True
            if phase == "failed":
                for key in ("missing", "corrupt", "extra"):
                    if status.get(key):
                        host.log(f"{what}: {key}: {', '.join(status[key])}", log_func=logger.error)
                host.log(f"{what}: {status.get('message')}", log_func=logger.error)
                return False
            gone += 1
            if gone > 3:  # the unit ended without writing a final state: it crashed
                host.log(f"{what}: {target.unit} ended without finishing; see "
                         f"journalctl -u {target.unit}", log_func=logger.error)
                return False
        time.sleep(POLL_S)


def _start_unit(target: Target, python: str, verify: bool, stop_first: bool) -> StringCommand:
    start = ["systemd-run", f"--unit={target.unit}", "--collect", "--quiet",
             "-p", QuoteString(f"Description=Fetch {target.repo} into {target.local_dir} "
                               "(tasks/weights.py)"),
             python, HOST_SCRIPT, "--job", QuoteString(f"{target.state_dir}/job.json")]
    if verify:
        start.append("--verify")
    prefix = ["systemctl", "stop", target.unit, "2>/dev/null;"] if stop_first else []
    # systemd unloads a stopped or failed transient unit from its event loop, after
    # reset-failed has returned: until it has, systemd-run refuses the name ("already loaded").
    # A fetch killed with SIGKILL was seen to stay loaded (inactive, dead) for good on systemd
    # 252: then drop its leftover transient file and reload, which unloads it.
    unit = target.unit
    unloaded = (
        f"for attempt in $(seq 50); do [ \"$(systemctl show -p LoadState --value {unit})\" = "
        f"not-found ] && break; sleep 0.1; done; "
        f"if [ \"$(systemctl show -p LoadState --value {unit})\" != not-found ] && "
        f"! systemctl is-active -q {unit}; then rm -f /run/systemd/transient/{unit} && "
        f"systemctl daemon-reload; fi;")
    return StringCommand(*prefix, "rm", "-f", QuoteString(f"{target.state_dir}/status.json"), ";",
                         "systemctl", "reset-failed", unit, "2>/dev/null;", unloaded, *start)


@operation(is_idempotent=False)
def hub_tree_checked(problems: list[str]):
    """
    Fail, naming every problem, before any byte of weights is fetched; otherwise change nothing.

    + problems: one line each (tasks.weights.problems)
    """
    if not problems:
        host.noop("Hub metadata and free space allow the fetch")
        return
    message = "weights fetch refused:\n" + "\n".join(problems) + "\n"
    yield StringCommand("printf", "%s", QuoteString(message), ">&2", "&&", "exit", "1")


@operation()
def hub_tree_fetched(target: Target, hub: HubSettings, python: str):
    """
    Make ``target.local_dir`` hold ``target.repo`` at the resolved commit, every file checked
    against the Hub's checksum, fetched by ``hf download`` in a transient systemd unit.

    + target: repo, revision, local folder (and the unit and state folder derived from it)
    + hub: endpoint, token, patterns, workers, Xet, watchdog and attempts
    + python: the hf venv's interpreter on the host

    A complete tree (manifest + unchanged sizes and mtimes) yields no command. Otherwise the job
    is pushed, the unit started (or, if a previous deploy's unit still runs the same job,
    joined), and the deploy follows its status file until it ends, logging bytes and rate.

    **Example:**

    .. code:: python

        hub_tree_fetched(name="Fetch Kimi-K2.6", target=Target("model", "moonshotai/Kimi-K2.6",
                         "main", "/raid/models/kimi-k2.6"), hub=hub, python="/opt/hf/venv/bin/python3")
    """
    listing = hub_listing(target.repo, target.revision, hub.endpoint, hub.token, hub.include,
                          hub.exclude)
    tree = host.get_fact(WeightsTree, path=target.local_dir, state_dir=target.state_dir,
                         unit=target.unit)
    if is_complete(listing, tree) and not tree["unit_active"]:
        host.noop(f"{target.local_dir} holds {target.repo}@{listing.commit[:12]}: "
                  f"{len(listing.files)} files, {listing.total_bytes / 1e9:.2f} GB, verified")
        return
    job = job_for(target, listing, hub, python)
    body = json.dumps(job, indent=1, sort_keys=True).encode()
    same_job = tree["job_sha256"] == hashlib.sha256(body).hexdigest()
    if tree["unit_active"] and same_job:
        host.noop(f"{target.unit} is already fetching this job: following it")
    else:
        yield StringCommand("mkdir", "-p", "-m", "0700", QuoteString(target.state_dir))
        yield FileUploadCommand(io.BytesIO(body), f"{target.state_dir}/job.json")
        # Stop whatever still holds the unit's name (a killed fetch can linger while systemd
        # tears it down), or systemd-run refuses to start a new one.
        yield _start_unit(target, python, verify=False, stop_first=True)
    yield FunctionCommand(_follow, (target, False), {})


@operation(is_idempotent=False)
def hub_tree_verified(target: Target, hub: HubSettings, python: str):
    """
    Re-hash every file of ``target.local_dir`` against the Hub's checksums; fail naming the
    missing, corrupt (deleted, so the next deploy fetches them) and extra files.

    + target, hub, python: as for hub_tree_fetched
    """
    listing = hub_listing(target.repo, target.revision, hub.endpoint, hub.token, hub.include,
                          hub.exclude)
    body = json.dumps(job_for(target, listing, hub, python), indent=1, sort_keys=True).encode()
    yield StringCommand("mkdir", "-p", "-m", "0700", QuoteString(target.state_dir))
    yield FileUploadCommand(io.BytesIO(body), f"{target.state_dir}/job.json")
    yield _start_unit(target, python, verify=True, stop_first=True)
    yield FunctionCommand(_follow, (target, True), {})


@operation()
def undeclared_removed(local_dir: str, paths: list[str]):
    """
    Remove files nobody declared from a complete weights folder (a fetch removes them itself).

    + local_dir: the weights folder
    + paths: relative to it (tasks.operations.undeclared_files of the listing and the
      WeightsTree fact); empty: nothing to do
    """
    if not paths:
        host.noop(f"{local_dir} holds only the files of its listing")
        return
    yield StringCommand("rm", "-f", "--", *(QuoteString(f"{local_dir}/{path}") for path in paths))


@operation()
def orphans_removed(local_dir: str, incomplete_bytes: int):
    """
    Remove ``*.incomplete`` files an interrupted client left in a weights folder.

    + local_dir: the weights folder
    + incomplete_bytes: what the WeightsTree fact found (0: nothing to do)
    """
    if not incomplete_bytes:
        host.noop(f"no .incomplete files under {local_dir}")
        return
    yield StringCommand("find", QuoteString(f"{local_dir}/{INCOMPLETE_DIR}"), "-name",
                        "'*.incomplete'", "-type", "f", "-delete")


class ChangedIfAny:
    """Restart trigger for vllm_service.run: changes when any of the fetches changes."""

    def __init__(self, operations):
        self.operations = list(operations)

    @property
    def will_change(self) -> bool:
        return any(op.will_change for op in self.operations)

    def did_change(self) -> bool:
        return any(op.did_change() for op in self.operations)


# ---- the task ------------------------------------------------------------------------------

def token_removed() -> None:
    """No Hub token stays on a host that does not use one (the push path, a public repo)."""
    files.file(name=f"Remove Hub token {TOKEN_FILE}", path=TOKEN_FILE, present=False)


@deploy("Model weights")
def place():
    """Converge the model folder (and the EAGLE-3 draft's, when speculative decoding is on) to
    the controller's copy or to the Hub repo at the pinned revision, and to nothing else (files
    nobody declared are removed: vLLM reads the folder), with no Hub token left on a host that
    needs none; returns what changed them (the restart trigger).

    Data keys: model_profile, model_revision, model_speculative, model_draft_repo,
    model_draft_revision, model_source_dir, weights_dir, weights_hf_endpoint,
    weights_hf_token_file, weights_include, weights_exclude, weights_max_workers, weights_xet,
    weights_stall_timeout_s, weights_download_attempts, weights_verify_full, hf_cli_*.
    """
    settings = resolve(host)
    if settings.model_source_dir is not None:
        token_removed()
        return tree_synced(name=f"Place {settings.profile.name} weights in {settings.model_dir}",
                           src=settings.model_source_dir, dest=settings.model_dir)
    hub = read_hub_settings(host.name, host.data)
    found = problems(host, settings, hub)
    for line in found:
        logger.warning(f"weights: {line}")
    hub_tree_checked(name="Check Hub revision and free space for the weights", problems=found)
    if found:
        return ChangedIfAny([])
    python = hf_cli.install()
    if hub.token:
        secret_file(name=f"Install Hub token {TOKEN_FILE}", dest=TOKEN_FILE, content=hub.token)
    else:
        token_removed()
    files.put(name="Install the weights fetch script", src=str(FETCH_SCRIPT), dest=HOST_SCRIPT,
              user="root", group="root", mode="755", create_remote_dir=True)
    changes = []  # what vLLM reads: the restart trigger
    for target in targets(settings, hub):
        if hub.verify_full:
            hub_tree_verified(name=f"Verify {target.label} {target.local_dir} against the Hub",
                              target=target, hub=hub, python=python)
        changes.append(hub_tree_fetched(
            name=f"Fetch {target.label} {target.repo}@{target.revision} into {target.local_dir}",
            target=target, hub=hub, python=python))
        tree = host.get_fact(WeightsTree, path=target.local_dir, state_dir=target.state_dir,
                             unit=target.unit)
        listing = hub_listing(target.repo, target.revision, hub.endpoint, hub.token,
                              hub.include, hub.exclude)
        # An incomplete tree is the fetch's job (it removes them first); a complete one with
        # orphans was touched by hand, and cleaning it must not restart vLLM.
        if is_complete(listing, tree) and not tree["unit_active"]:
            orphans_removed(name=f"Remove orphaned .incomplete files in {target.local_dir}",
                            local_dir=target.local_dir,
                            incomplete_bytes=tree["incomplete_bytes"])
            # Files placed by hand beside a complete tree: vLLM reads them (a restart follows).
            changes.append(undeclared_removed(
                name=f"Remove undeclared files from {target.local_dir}",
                local_dir=target.local_dir, paths=undeclared_files(tree["files"], listing.files)))
    return changes[0] if len(changes) == 1 else ChangedIfAny(changes)
