"""What the Hub has: the client's settings (this task's data keys) and, asked once per run from
the controller, a repo's listing at a revision: the commit, and every file's size and checksum."""

from __future__ import annotations

import hashlib
import os
import threading
from dataclasses import dataclass
from pathlib import Path

from tasks import data_keys, secrets
from tasks.data_keys import DataError, Problem, problem
from tasks.settings import REPO

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
    verify_schedule: str | None  # OnCalendar of the scheduled deep verify; None: none
    draft_revision: str
    peer_copy: bool  # fetched once per fleet (tasks.weights.peers_of)
    peer_port: int
    peer_address: str | None  # None: ssh_hostname, else the inventory name


def read_hub_token(host_name: str, token_file: str | None, environ=os.environ,
                   token_command: str | None = None) -> tuple[str | None, list[Problem]]:
    """The Hub token: from weights_hf_token_file (a controller file outside this repository),
    or what weights_hf_token_command prints, else HF_TOKEN from the controller's environment;
    None without any."""
    if token_command is not None:
        return secrets.from_command(host_name, "weights_hf_token_command", token_command)
    if token_file is None:
        return (environ.get("HF_TOKEN") or "").strip() or None, []
    path = Path(os.path.expanduser(token_file))
    path = (path if path.is_absolute() else REPO / path).resolve()
    # A token inside the repository is one `git add` away from being published.
    if path == REPO or REPO in path.parents:
        return None, [problem(host_name, "weights_hf_token_file", token_file,
                              f"a file outside this repository (it is inside {REPO})")]
    token = path.read_text().strip() if path.is_file() else ""
    if not token:
        return None, [problem(host_name, "weights_hf_token_file", token_file,
                              "a readable, non-empty file on the controller")]
    return token, []


def read_hub_settings(host_name: str, data, environ=os.environ) -> HubSettings:
    """The Hub client's keys, checked (tasks/data_keys.py), and the token they point at;
    DataError holds every problem."""
    problems = data_keys.check(host_name, data)
    token_file, token_command = (data.get("weights_hf_token_file"),
                                 data.get("weights_hf_token_command"))
    problems += secrets.one_source(host_name, "weights_hf_token_file", token_file,
                                   "weights_hf_token_command", token_command)
    unreadable = {"weights_hf_token_file", "weights_hf_token_command"} & {p.key for p in problems}
    token, found = (None, []) if unreadable \
        else read_hub_token(host_name, token_file, environ, token_command)
    if problems or found:
        raise DataError(problems + found)
    values = data_keys.read(host_name, data)
    endpoint = values["weights_hf_endpoint"]
    return HubSettings(endpoint=endpoint.rstrip("/") if endpoint else None, token=token,
                       include=tuple(values["weights_include"]),
                       exclude=tuple(values["weights_exclude"]),
                       max_workers=values["weights_max_workers"], xet=values["weights_xet"],
                       stall_timeout_s=values["weights_stall_timeout_s"],
                       attempts=values["weights_download_attempts"],
                       verify_full=values["weights_verify_full"],
                       verify_schedule=values["weights_verify_schedule"],
                       draft_revision=values["model_draft_revision"],
                       peer_copy=values["weights_peer_copy"],
                       peer_port=values["weights_peer_port"],
                       peer_address=values["weights_peer_address"])


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
    where = endpoint or "the Hub"
    info = _model_info(repo, revision, endpoint, token)
    listed = _listed_files(info, repo, where, include, exclude)
    if not listed:
        raise HubLookupError(f"{repo}@{revision} at {where}: no file matches weights_include "
                             f"{list(include)} / weights_exclude {list(exclude)}")
    return Listing(repo=repo, revision=revision, commit=info.sha, files=listed)


def _model_info(repo, revision, endpoint, token):
    """The Hub's model info with every file's metadata; each failure as one HubLookupError."""
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, RepositoryNotFoundError,
                                        RevisionNotFoundError)

    # The client's telemetry off, as on the hosts (files/weights-fetch.py): with it on, the
    # first request of a run also asks the default Hub, not ``endpoint``, for its list of AI
    # agents (huggingface_hub.utils._detect_agent), so a controller told to use a mirror
    # reached out to the Hub anyway, and an offline one spent ~0.1 s of CPU failing to.
    constants.HF_HUB_DISABLE_TELEMETRY = True
    where = endpoint or "the Hub"
    try:
        return HfApi(endpoint=endpoint, token=token or False).model_info(
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


def _listed_files(info, repo: str, where: str, include, exclude) -> dict:
    """path -> {"size", "git_sha1", "sha256"} of the files the patterns select."""
    from huggingface_hub.utils import filter_repo_objects

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
    return listed
