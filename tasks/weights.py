"""Model weights in <weights_dir>/<profile local name> on the host: pushed from the controller
(model_source_dir) or fetched from the Hub with the pinned `hf` CLI, verified, never twice.

How a fetch runs: one Target per weights folder; its job (tasks/weights_job.py) is pushed to the
host, files/weights-fetch.py runs it in a transient systemd unit, and the deploy follows the
unit's status file until it ends. What the Hub lists is tasks/weights_hub.py; what the host
holds, tasks.facts.WeightsTree and the rules of tasks/weights_host.py.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path

from pyinfra import host, logger
from pyinfra.api import (FileUploadCommand, FunctionCommand, QuoteString, StringCommand, deploy,
                         operation)
from pyinfra.facts.files import Directory, File, FindFiles, Sha256File
from pyinfra.operations import files, server, systemd

from tasks import data_keys, facts_together, hf_cli
from tasks.facts import FreeBytes, TreeDigests, WeightsTree
from tasks.inventory_check import address_of, serves
from tasks.operations import secret_file_present, tree_synced, undeclared_files
from tasks.settings import REPO, TEMPLATES, UNIT_DIR, Settings, read_settings
from tasks.weights_host import is_complete, space_problem
from tasks.weights_hub import HubLookupError, HubSettings, Listing, hub_listing, read_hub_settings
from tasks.weights_job import (AUDIT_FILE, CLIENT_RECORDS_DIR, HOST_SCRIPT, INCOMPLETE_GLOB,
                               JOB_FILE, RECORDS_DIR, STATE_ROOT, STATUS_FILE, TOKEN_FILE, Job)

FETCH_SCRIPT = REPO / "files" / "weights-fetch.py"
# How often the deploy asks the host how far the download got, and how often it says so.
POLL_S = 2.0
REPORT_EVERY_S = 10.0
# Polls that find the unit gone without a final state before the fetch counts as crashed.
GONE_POLLS = 3
# The scheduled deep verify's spread: trays of one rack do not all start hashing at once.
VERIFY_RANDOMIZED_DELAY_S = 3600
# The scheduled deep verifies' unit files (Target.verify_unit, verify_timer), as find matches.
VERIFY_UNITS = "weights-verify-*"
# weights_peer_copy: the server every copying host runs (templates/weights-peer.service.j2).
PEER_UNIT = "weights-peer.service"


# ---- what to fetch where -------------------------------------------------------------------

def slug_of(local_dir: str) -> str:
    """A weights folder's name for its units and state: its name for people, and a digest of
    its path so that two folders with the same name (a moved weights_dir, a test tree) never
    share a unit or state."""
    digest = hashlib.sha256(local_dir.encode()).hexdigest()[:8]
    return f"{Path(local_dir).name}-{digest}"


def state_dir_of(local_dir: str) -> str:
    """The Hub fetch's state folder for a weights folder (its job, status and last verify)."""
    return f"{STATE_ROOT}/{slug_of(local_dir)}"


@dataclass(frozen=True)
class Target:
    label: str  # "model" or "draft"
    repo: str
    revision: str
    local_dir: str

    @property
    def slug(self) -> str:
        return slug_of(self.local_dir)

    @property
    def unit(self) -> str:
        return f"weights-fetch-{self.slug}.service"

    @property
    def state_dir(self) -> str:
        return state_dir_of(self.local_dir)

    @property
    def job_file(self) -> str:
        return f"{self.state_dir}/{JOB_FILE}"

    @property
    def status_file(self) -> str:
        return f"{self.state_dir}/{STATUS_FILE}"

    @property
    def verify_unit(self) -> str:
        """The scheduled deep verify (weights_verify_schedule) and its timer."""
        return f"weights-verify-{self.slug}.service"

    @property
    def verify_timer(self) -> str:
        return f"weights-verify-{self.slug}.timer"

    @property
    def audit_file(self) -> str:
        return f"{self.state_dir}/{AUDIT_FILE}"


def targets(settings: Settings, hub: HubSettings) -> list[Target]:
    found = [Target("model", settings.profile.repo, settings.model_revision, settings.model_dir)]
    if settings.draft_dir:
        found.append(Target("draft", settings.draft_repo, hub.draft_revision, settings.draft_dir))
    return found


def listing_of(target: Target, hub: HubSettings) -> Listing:
    """The Hub's listing of ``target`` (asked once per run: tasks.weights_hub.hub_listing)."""
    return hub_listing(target.repo, target.revision, hub.endpoint, hub.token, hub.include,
                       hub.exclude)


def tree_fact(target: Target) -> tuple[type, dict]:
    """The WeightsTree fact of ``target``'s folder, with its arguments."""
    return WeightsTree, {"path": target.local_dir, "state_dir": target.state_dir,
                         "unit": target.unit}


def tree_of(target: Target, host_obj=host) -> dict:
    """The WeightsTree fact of ``target``'s folder on ``host_obj`` (the current host)."""
    fact, arguments = tree_fact(target)
    return host_obj.get_fact(fact, **arguments)


# Trees read while planning, by run (pyinfra's State) and host: see planned_tree.
_PLANNED_TREES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def planned_tree(host_obj, target: Target) -> dict:
    """The WeightsTree fact of ``target``'s folder, asked once per host and run while planning:
    the preflight, the Hub check and the tidy-up read it before any operation has run, so they
    share one answer (pyinfra 3 caches no fact, and each ask is an SSH round trip and a find
    over the folder). Operations call tree_of instead: pyinfra runs them again while
    executing, after earlier operations may have changed the folder."""
    if host_obj.state.is_executing:
        return tree_of(target, host_obj)
    trees = _PLANNED_TREES.setdefault(host_obj.state, {})
    key = (host_obj.name, target.local_dir, target.state_dir, target.unit)
    if key not in trees:
        trees[key] = tree_of(target, host_obj)
    return trees[key]


def job_for(target: Target, listing: Listing, hub: HubSettings, python: str,
            peers: list[str] = ()) -> Job:
    return Job(
        repo=listing.repo, commit=listing.commit, local_dir=target.local_dir,
        state_dir=target.state_dir, unit=target.unit, endpoint=hub.endpoint,
        include=list(hub.include), exclude=list(hub.exclude), max_workers=hub.max_workers,
        xet=hub.xet, stall_timeout_s=hub.stall_timeout_s, attempts=hub.attempts,
        token_file=TOKEN_FILE if hub.token else None, hf=str(Path(python).parent / "hf"),
        files=listing.files, peers=list(peers),
    )


# ---- fetched once per fleet ----------------------------------------------------------------

def peer_url(name: str, data) -> str:
    """The base URL a host's weights server is reached at (and binds to)."""
    values = data_keys.as_dict(data)
    address = values.get("weights_peer_address") or address_of(name, values)
    port = values.get("weights_peer_port", data_keys.DEFAULTS["weights_peer_port"])
    return f"http://{address}:{port}"


def peers_of(name: str, hosts) -> list[str]:
    """Where host ``name`` copies its weights from, in order: its sources in a binary tree of
    the serving hosts (name, groups, data) with weights_peer_copy on, in inventory order.
    The first fetches from the Hub (no peers); host i copies from host (i-1)//2, then from
    that host's sources. Each host serves at most two others, so the Hub's bytes reach N
    hosts in log2(N) hops, each file passed on as soon as it is verified."""
    copiers = [(other, data) for other, groups, data in hosts
               if serves(groups) and data_keys.as_dict(data).get("weights_peer_copy")]
    names = [other for other, _ in copiers]
    if name not in names:
        return []  # not a serving host: it fetches from the Hub, and serves no one
    index, found = names.index(name), []
    while index > 0:
        index = (index - 1) // 2
        found.append(peer_url(*copiers[index]))
    return found


def host_peers(hub: HubSettings) -> list[str]:
    """peers_of the current host, from every host of the inventory (not only a --limit's)."""
    if not hub.peer_copy:
        return []
    return peers_of(host.name, [(other.name, set(map(str, other.groups)), other.data)
                                for other in host.inventory])


def problems(host_obj, settings: Settings, hub: HubSettings) -> list[str]:
    """Every reason the Hub fetch cannot start on this host, one line each (for the preflight):
    unknown repo or revision, unreachable endpoint, not enough free space."""
    found = []
    for target in targets(settings, hub):
        try:
            listing = listing_of(target, hub)
        except HubLookupError as error:
            key = "model_revision" if target.label == "model" else "model_draft_revision"
            found.append(f"{host_obj.name}: {key}: {error}")
            continue
        tree = planned_tree(host_obj, target)
        if is_complete(listing, tree):
            continue
        problem = space_problem(host_obj.name, target.local_dir, listing, tree,
                                host_obj.get_fact(FreeBytes, path=target.local_dir))
        if problem:
            found.append(problem)
    return found


# ---- the unit on the host, and following it ------------------------------------------------

def _unit_unloaded(unit: str) -> str:
    """Shell that waits for systemd to unload ``unit``, or unloads it.

    systemd unloads a stopped or failed transient unit from its event loop, after reset-failed
    has returned: until it has, systemd-run refuses the name ("already loaded"). A fetch killed
    with SIGKILL was seen to stay loaded (inactive, dead) for good on systemd 252: then drop its
    leftover transient file and reload, which unloads it.
    """
    load_state = f"\"$(systemctl show -p LoadState --value {unit})\""
    return (f"for attempt in $(seq 50); do [ {load_state} = not-found ] && break; sleep 0.1; "
            f"done; if [ {load_state} != not-found ] && ! systemctl is-active -q {unit}; then "
            f"rm -f /run/systemd/transient/{unit} && systemctl daemon-reload; fi;")


def _start_unit(target: Target, python: str, verify: bool) -> StringCommand:
    """Stop whatever still holds the unit's name (a killed fetch can linger while systemd tears
    it down, and systemd-run refuses to start a new one), then run the script on the job."""
    run_script = ["systemd-run", f"--unit={target.unit}", "--collect", "--quiet",
                  "-p", QuoteString(f"Description=Fetch {target.repo} into {target.local_dir} "
                                    "(tasks/weights.py)"),
                  python, HOST_SCRIPT, "--job", QuoteString(target.job_file)]
    if verify:
        run_script.append("--verify")
    # A deploy comes before the scheduled verify: stopped, it leaves the manifest as it was.
    return StringCommand("systemctl", "stop", target.verify_unit, "2>/dev/null;",
                         "systemctl", "stop", target.unit, "2>/dev/null;",
                         "rm", "-f", QuoteString(target.status_file), ";",
                         "systemctl", "reset-failed", target.unit, "2>/dev/null;",
                         _unit_unloaded(target.unit), *run_script)


def _job_started(target: Target, job: Job, python: str, verify: bool):
    """The commands that push ``job`` into the state folder and start the unit on it."""
    yield StringCommand("mkdir", "-p", "-m", "0700", QuoteString(target.state_dir))
    yield FileUploadCommand(io.BytesIO(job.to_json()), target.job_file)
    yield _start_unit(target, python, verify=verify)


def _unit_status(host, target: Target) -> tuple[bool, dict]:
    """(whether the unit is still running, its status file: {} until the script writes one)."""
    ok, output = host.run_shell_command(StringCommand(
        "cat", QuoteString(target.status_file), "2>/dev/null;", "echo;",
        "systemctl", "is-active", target.unit, "||", "true"))
    lines = output.stdout_lines if ok else []
    active = bool(lines) and lines[-1].strip() in ("active", "activating")
    try:
        status = json.loads("\n".join(lines[:-1])) if len(lines) > 1 else {}
    except ValueError:
        status = {}  # read while being replaced: the next poll gets it
    return active, status


def _progress(status: dict) -> str:
    done, total = status.get("bytes_done", 0), status.get("bytes_total", 0) or 1
    return (f"{status.get('state') or 'starting'} {done / 1e9:.2f}/{total / 1e9:.2f} GB "
            f"({100 * done / total:.0f}%), {status.get('rate_bytes_per_s', 0) / 1e6:.1f}"
            f" MB/s, attempt {status.get('attempt', 0)}/{status.get('attempts', '?')}")


def _log_failure(host, what: str, status: dict) -> None:
    for key in ("missing", "corrupt", "extra"):
        if status.get(key):
            host.log(f"{what}: {key}: {', '.join(status[key])}", log_func=logger.error)
    host.log(f"{what}: {status.get('message')}", log_func=logger.error)


def _follow(state, host, target: Target, verify: bool) -> bool:
    """Poll the unit's status file until it finishes, logging progress; True when done."""
    what = f"{'verify' if verify else 'fetch'} {target.repo} -> {target.local_dir}"
    last_report, last_state, gone = 0.0, None, 0
    while True:
        active, status = _unit_status(host, target)
        phase = status.get("state")
        now = time.monotonic()
        if phase != last_state or now - last_report >= REPORT_EVERY_S or not active:
            host.log(f"{what}: {_progress(status)}")
            last_report, last_state = now, phase
        if not active:
            if phase == "done":
                return True
            if phase == "failed":
                _log_failure(host, what, status)
                return False
            gone += 1
            if gone > GONE_POLLS:  # the unit ended without writing a final state: it crashed
                host.log(f"{what}: {target.unit} ended without finishing; see "
                         f"journalctl -u {target.unit}", log_func=logger.error)
                return False
        time.sleep(POLL_S)


# ---- operations ----------------------------------------------------------------------------

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
def hub_tree_fetched(target: Target, listing: Listing, hub: HubSettings, python: str,
                     peers: list[str] | None = None):
    """
    Make ``target.local_dir`` hold ``target.repo`` at the resolved commit, every file checked
    against the Hub's checksum, copied from peers or fetched by ``hf download``, in a transient
    systemd unit.

    + target: repo, revision, local folder (and the unit and state folder derived from it)
    + listing: the Hub's listing of the target (listing_of): commit, sizes, checksums
    + hub: endpoint, token, patterns, workers, Xet, watchdog and attempts
    + python: the hf venv's interpreter on the host
    + peers: weights servers to copy from before the Hub, in order (host_peers)

    A complete tree (manifest + unchanged sizes and mtimes) yields no command. Otherwise the job
    is pushed and the unit started (or, if a previous deploy's unit still runs the same job,
    joined); the unit runs on while the deploy does other work, and hub_tree_followed, later
    in the run, follows its status file until it ends, logging bytes and rate.

    **Example:**

    .. code:: python

        target = Target("model", "moonshotai/Kimi-K2.6", "main", "/raid/models/kimi-k2.6")
        hub_tree_fetched(name="Fetch Kimi-K2.6", target=target, listing=listing_of(target, hub),
                         hub=hub, python="/opt/hf/venv/bin/python3")
    """
    tree = tree_of(target)
    if is_complete(listing, tree) and not tree["unit_active"]:
        host.noop(f"{target.local_dir} holds {target.repo}@{listing.commit[:12]}: "
                  f"{len(listing.files)} files, {listing.total_bytes / 1e9:.2f} GB, verified")
        return
    job = job_for(target, listing, hub, python, peers or [])
    if tree["unit_active"] and tree["job_sha256"] == hashlib.sha256(job.to_json()).hexdigest():
        host.noop(f"{target.unit} is already fetching this job: joined")
        return
    yield from _job_started(target, job, python, verify=False)


@operation()
def hub_tree_followed(target: Target, running: bool):
    """
    Follow ``target``'s fetch unit until it ends, logging bytes, rate and attempt; fail, naming
    the missing and corrupt files and the cause, if the fetch failed.

    + target: as for hub_tree_fetched
    + running: whether this run started or joined a fetch of it (hub_tree_fetched's plan)

    **Example:**

    .. code:: python

        hub_tree_followed(name="Wait for the model fetch", target=target, running=True)
    """
    if not running:
        host.noop(f"{target.local_dir}: no fetch to wait for")
        return
    yield FunctionCommand(_follow, (target, False), {})


@operation(is_idempotent=False)
def hub_tree_verified(target: Target, listing: Listing, hub: HubSettings, python: str):
    """
    Re-hash every file of ``target.local_dir`` against the Hub's checksums; fail naming the
    missing, corrupt (deleted, so the next deploy fetches them) and extra files.

    + target, listing, hub, python: as for hub_tree_fetched
    """
    job = job_for(target, listing, hub, python)
    yield from _job_started(target, job, python, verify=True)
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
    yield StringCommand("find", QuoteString(f"{local_dir}/{CLIENT_RECORDS_DIR}"), "-name",
                        QuoteString(INCOMPLETE_GLOB), "-type", "f", "-delete")


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


def _fetch_tools_installed(hub: HubSettings):
    """The hf CLI, the token (or its absence) and the fetch script; returns the hf python and
    the script's operation."""
    python = hf_cli.install()
    if hub.token:
        secret_file_present(name=f"Install Hub token {TOKEN_FILE}", dest=TOKEN_FILE, content=hub.token)
    else:
        token_removed()
    script = files.put(name="Install the weights fetch script", src=str(FETCH_SCRIPT),
                       dest=HOST_SCRIPT, user="root", group="root", mode="755",
                       create_remote_dir=True)
    return python, script


def verify_unit_values(target: Target, schedule: str, python: str) -> dict:
    """What templates/weights-verify.{service,timer}.j2 are rendered with."""
    return {"service_unit": target.verify_unit, "timer_unit": target.verify_timer,
            "local_dir": target.local_dir, "records_dir": RECORDS_DIR,
            "state_dir": target.state_dir, "job_file": target.job_file,
            "status_file": target.audit_file, "python": python, "script": HOST_SCRIPT,
            "schedule": schedule, "randomized_delay_s": VERIFY_RANDOMIZED_DELAY_S}


def verify_scheduled(target: Target, schedule: str | None, python: str) -> None:
    """The scheduled deep verify of a Hub-fetched folder (weights-fetch.py --audit on a timer,
    at idle priority); with no schedule none, and verifies_pruned removes an earlier one."""
    if schedule is None:
        return
    values = verify_unit_values(target, schedule, python)
    units = [files.template(name=f"Install {unit}",
                            src=str(TEMPLATES / f"weights-verify.{kind}.j2"),
                            dest=f"{UNIT_DIR}/{unit}", user="root", group="root", mode="644",
                            **values)
             for kind, unit in (("service", target.verify_unit), ("timer", target.verify_timer))]
    # As for the drift check's timer: restarting a changed timer applies a new schedule now.
    systemd.service(name=f"Enable and start {target.verify_timer}, reload systemd if a unit "
                    "changed", service=target.verify_timer, running=True, enabled=True,
                    daemon_reload=any(unit.will_change for unit in units),
                    restarted=units[1].will_change)


def verifies_pruned(keep: list[Target]) -> None:
    """No scheduled verify on the host but those of ``keep``: none of a folder pushed from the
    controller (every deploy and drift check compares its sha256), none with
    weights_verify_schedule = None, and none of a folder no longer declared (a moved
    weights_dir, the draft turned off), whose timer would re-hash weights nobody serves."""
    wanted = {unit for target in keep for unit in (target.verify_timer, target.verify_unit)}
    found = host.get_fact(FindFiles, path=UNIT_DIR, maxdepth=1, fname=VERIFY_UNITS) or []
    stale = sorted({Path(path).name for path in found} - wanted)
    if not stale:
        return  # nothing to undo, and no need to ask systemd (a controller's @local has none)
    timers = [QuoteString(unit) for unit in stale if unit.endswith(".timer")]
    commands = [StringCommand("systemctl", "disable", "--now", *timers)] if timers else []
    server.shell(name="Remove the scheduled verifies of weights folders not declared here",
                 commands=[*commands, StringCommand("rm", "-f", *(
                     QuoteString(f"{UNIT_DIR}/{unit}") for unit in stale)),
                     "systemctl daemon-reload"])


@dataclass
class Placing:
    """What place() set going: the operations whose change vLLM must see so far (the restart
    trigger), and each Hub fetch with whether it runs (started or joined by this run)."""

    changes: list
    fetches: list[tuple[Target, bool]] = field(default_factory=list)


def _target_converged(target: Target, hub: HubSettings, python: str, placing: Placing) -> None:
    """Verify (if asked), start the fetch, tidy a complete folder, schedule the deep verify;
    adds to ``placing`` what vLLM must see change and the fetch to follow."""
    listing = listing_of(target, hub)
    if hub.verify_full:
        hub_tree_verified(name=f"Verify {target.label} {target.local_dir} against the Hub",
                          target=target, listing=listing, hub=hub, python=python)
    placing.changes.append(hub_tree_fetched(
        name=f"Fetch {target.label} {target.repo}@{target.revision} into {target.local_dir}",
        target=target, listing=listing, hub=hub, python=python, peers=host_peers(hub)))
    tree = planned_tree(host, target)
    complete = is_complete(listing, tree) and not tree["unit_active"]
    placing.fetches.append((target, not complete))
    # An incomplete tree is the fetch's job (it removes them first); a complete one with
    # orphans was touched by hand, and cleaning it must not restart vLLM.
    if complete:
        orphans_removed(name=f"Remove orphaned .incomplete files in {target.local_dir}",
                        local_dir=target.local_dir, incomplete_bytes=tree["incomplete_bytes"])
        # Files placed by hand beside a complete tree: vLLM reads them (a restart follows).
        placing.changes.append(undeclared_removed(
            name=f"Remove undeclared files from {target.local_dir}",
            local_dir=target.local_dir, paths=undeclared_files(tree["files"], listing.files)))
    verify_scheduled(target, hub.verify_schedule, python)


def peer_served(targets_: list[Target], hub: HubSettings, python: str, script) -> None:
    """weights_peer_copy: this host serves its verified weights to the hosts that copy from
    it (weights-peer.service), started before any fetch asks it; without it, no server."""
    if not hub.peer_copy:
        peer_unserved()
        return
    listen = peer_url(host.name, host.data).removeprefix("http://")
    unit = files.template(name=f"Install {PEER_UNIT} (this host's weights to its peers)",
                          src=str(TEMPLATES / "weights-peer.service.j2"),
                          dest=f"{UNIT_DIR}/{PEER_UNIT}",
                          user="root", group="root", mode="644", python=python,
                          script=HOST_SCRIPT, listen=listen,
                          job_files=[target.job_file for target in targets_])
    systemd.service(name=f"Enable and start {PEER_UNIT}, restart it if it changed",
                    service=PEER_UNIT, running=True, enabled=True,
                    daemon_reload=unit.will_change,
                    restarted=unit.will_change or script.will_change)


def peer_unserved() -> None:
    """No weights server left on a host that copies from no peer (or is pushed its weights)."""
    path = f"{UNIT_DIR}/{PEER_UNIT}"
    if not host.get_fact(File, path=path):
        return
    systemd.service(name=f"Stop and disable {PEER_UNIT}", service=PEER_UNIT, running=False,
                    enabled=False)
    files.file(name=f"Remove {PEER_UNIT}", path=path, present=False)
    systemd.daemon_reload(name=f"Reload systemd: {PEER_UNIT} was removed")


def facts_read(settings: Settings, hub: HubSettings | None) -> list[tuple[type, dict]]:
    """The facts place()'s operations read on a host where all is in place (to be asked
    together first: tasks/facts_together.py), on the Hub path (``hub``) or the push path. One
    listed here that no operation reads, or one read that is not listed, costs time, never a
    wrong answer."""
    if hub is None:
        return [(File, {"path": TOKEN_FILE}),
                (FindFiles, {"path": UNIT_DIR, "maxdepth": 1, "fname": VERIFY_UNITS}),
                (File, {"path": f"{UNIT_DIR}/{PEER_UNIT}"}),
                (TreeDigests, {"path": settings.model_dir})]
    declared = targets(settings, hub)
    wanted = [*hf_cli.facts_read(host.name, host.data),
              *(facts_together.written_file(TOKEN_FILE, Sha256File) if hub.token
                else [(File, {"path": TOKEN_FILE})]),
              (Directory, {"path": str(Path(HOST_SCRIPT).parent)}),
              *facts_together.written_file(HOST_SCRIPT),
              *facts_together.written_file(f"{UNIT_DIR}/{PEER_UNIT}"),
              *(facts_together.service(PEER_UNIT) if hub.peer_copy else []),
              # files.template creates the unit folder if it is missing: its stat.
              (Directory, {"path": UNIT_DIR}),
              (FindFiles, {"path": UNIT_DIR, "maxdepth": 1, "fname": VERIFY_UNITS})]
    for target in declared:
        wanted.append(tree_fact(target))
        if hub.verify_schedule is not None:
            for unit in (target.verify_unit, target.verify_timer):
                wanted += facts_together.written_file(f"{UNIT_DIR}/{unit}")
            wanted += facts_together.service(target.verify_timer)
    return wanted


def _fetched_from_hub(settings: Settings, hub: HubSettings) -> Placing:
    facts_together.ask_together(host, facts_read(settings, hub))
    found = problems(host, settings, hub)
    for line in found:
        logger.warning(f"weights: {line}")
    hub_tree_checked(name="Check Hub revision and free space for the weights", problems=found)
    placing = Placing(changes=[])
    if found:
        return placing
    python, script = _fetch_tools_installed(hub)
    declared = targets(settings, hub)
    peer_served(declared, hub, python, script)
    for target in declared:
        _target_converged(target, hub, python, placing)
    verifies_pruned(declared if hub.verify_schedule is not None else [])
    return placing


@deploy("Model weights")
def place() -> Placing:
    """Converge the model folder (and the EAGLE-3 draft's, when speculative decoding is on) to
    the controller's copy or to the Hub repo at the pinned revision, and to nothing else (files
    nobody declared are removed: vLLM reads the folder), with no Hub token left on a host that
    needs none. A Hub fetch is started in its own unit and runs on: ready() waits for it.

    Data keys: model_profile, model_revision, model_speculative, model_draft_repo,
    model_draft_revision, model_source_dir, weights_dir, weights_hf_endpoint,
    weights_hf_token_file, weights_include, weights_exclude, weights_max_workers, weights_xet,
    weights_stall_timeout_s, weights_download_attempts, weights_verify_full,
    weights_verify_schedule, weights_peer_copy, weights_peer_port, weights_peer_address,
    hf_cli_*.
    """
    settings = read_settings(host)
    if settings.model_source_dir is not None:
        facts_together.ask_together(host, facts_read(settings, None))
        token_removed()
        verifies_pruned([])
        peer_unserved()
        return Placing(changes=[tree_synced(
            name=f"Place {settings.profile.name} weights in {settings.model_dir}",
            src=settings.model_source_dir, dest=settings.model_dir)])
    return _fetched_from_hub(settings, read_hub_settings(host.name, host.data))


@deploy("Model weights")
def ready(placing: Placing):
    """Wait for the Hub fetches place() started (they ran while the deploy did other work) and
    fail if one failed; returns what changed the weights (the restart trigger)."""
    changes = list(placing.changes)
    for target, running in placing.fetches:
        changes.append(hub_tree_followed(
            name=f"Wait for the {target.label} fetch into {target.local_dir}", target=target,
            running=running))
    return changes[0] if len(changes) == 1 else ChangedIfAny(changes)
