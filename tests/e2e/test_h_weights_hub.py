"""Weights from a Hub mirror with the real `hf` CLI on the e2e sandbox hosts: hub-mirror
listens on each host's controller address (never anything wider) and serves a repo of several
shards at a pinned commit; tests/e2e/hub_deploy.py runs preflight, system and weights into
/raid/hub-e2e (vLLM keeps serving the pushed model), then the last test runs the whole runbook
with a changed revision and counts restarts."""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tasks.weights import Target
from tests.e2e.common import ENV, PYINFRA, chat, commands_run, service_start
from tests.helpers import REPO

REPO_ID = "sandbox/tiny-kimi"
WEIGHTS = "/raid/hub-e2e"
TREE = f"{WEIGHTS}/tiny-kimi"
PIECE = 10 * 1024 * 1024  # the client writes in pieces of this size
BIG = "extra-00001-of-00002.safetensors"
BIG2 = "extra-00002-of-00002.safetensors"
# Developing this module alone on one's own sandbox: HUB_E2E_SANDBOX=name (see conftest there).
OWN_SANDBOX = ({"SANDBOX_NAME": os.environ["HUB_E2E_SANDBOX"]}
               if os.environ.get("HUB_E2E_SANDBOX") else {})


class HostMirror:
    """hub-mirror on one sandbox host's controller address."""

    def __init__(self, workdir: Path, address: str, folder: Path, token_file: Path):
        self.state = workdir / f"mirror-{address}.json"
        self.log = open(workdir / f"mirror-{address}.log", "wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "harness.hub_mirror", "--listen", f"{address}:0",
             "--repo", f"{REPO_ID}={folder}", "--state-file", str(self.state),
             "--token-file", str(token_file)], cwd=REPO, stdout=self.log,
            stderr=subprocess.STDOUT)
        self.token = token_file.read_text().strip()
        deadline = time.monotonic() + 30
        while not self.state.exists():
            assert self.process.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        self.url = json.loads(self.state.read_text())["url"]
        self.port = int(self.url.rsplit(":", 1)[1])

    def call(self, method: str, path: str, body=None):
        request = urllib.request.Request(self.url + path, method=method,
                                         data=json.dumps(body).encode() if body else None,
                                         headers={"Authorization": f"Bearer {self.token}"})
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.load(response)

    def sent(self) -> dict[str, int]:
        return {key.split("/")[-1]: n for key, n in self.call("GET", "/_mirror/stats")
                ["bytes_sent"].items()}

    def reset(self) -> None:
        self.call("POST", "/_mirror/stats/reset")
        self.call("DELETE", "/_mirror/faults")

    def stop(self) -> None:
        os.kill(self.process.pid, signal.SIGTERM)
        self.process.wait(timeout=10)
        self.log.close()


def serve_on_every_tray(sandbox, workdir: Path, folder: Path, token_file) -> dict:
    """{tray: its HostMirror of ``folder``, on the tray's controller address}."""
    return {h["name"]: HostMirror(workdir, h["controller_address"], folder, token_file)
            for h in sandbox["hosts"]}


def stop_running(mirrors: dict) -> None:
    for mirror in mirrors.values():
        if mirror.process.poll() is None:
            mirror.stop()


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Path:
    """The tiny model plus two random 25 MB shards: big enough to cut mid-file."""
    folder = tmp_path_factory.mktemp("hub-repo")
    for path in (REPO / ".cache" / "tiny-model").iterdir():
        shutil.copy2(path, folder / path.name)
    for name in (BIG, BIG2):
        (folder / name).write_bytes(os.urandom(25 * 1024 * 1024))
    return folder


@pytest.fixture(scope="module")
def token_file(tmp_path_factory) -> Path:
    # Outside the repository, as weights_hf_token_file requires.
    path = tmp_path_factory.mktemp("hub-token") / "token"
    path.write_text("hf_e2e_" + os.urandom(12).hex() + "\n")
    path.chmod(0o600)
    return path


@pytest.fixture(scope="module")
def mirrors(sandbox, served, token_file, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("mirrors")
    started = serve_on_every_tray(sandbox, workdir, served, token_file)
    yield started
    stop_running(started)


@pytest.fixture
def mirror(mirrors):
    for each in mirrors.values():
        each.reset()
    return mirrors


def hub_env(mirrors, token_file, full=False, **data) -> dict:
    """The environment tests/e2e/hub_inventory.py and hub_deploy.py read."""
    return {**ENV, **OWN_SANDBOX,
            "HUB_E2E_PORTS": json.dumps({n: m.port for n, m in mirrors.items()}),
            "HUB_E2E_TOKEN_FILE": str(token_file), "HUB_E2E_RUNBOOK": "full" if full else "",
            "HUB_E2E_DATA": json.dumps({"weights_dir": WEIGHTS, "weights_stall_timeout_s": 30,
                                        **data})}


def deploy(mirrors, token_file, check=True, background=False, full=False, dry=False,
           debug=False, **data):
    env = hub_env(mirrors, token_file, full, **data)
    # -y with --dry plans nothing: pyinfra computes a plan's changes only when it would ask.
    command = [PYINFRA, "--dry" if dry else "-y", "--json", *(["--debug"] if debug else []),
               "tests/e2e/hub_inventory.py", "tests/e2e/hub_deploy.py"]
    if background:
        return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=900)
    result.output = result.stdout + result.stderr
    if check:
        assert result.returncode == 0, result.output[-4000:]
    return result


def changed_operations(result) -> dict[str, list[str]]:
    """Operation name -> hosts it changed, from pyinfra's --json report."""
    report = json.loads(result.stdout)
    return {op["name"]: op["success"] for op in report["results"]["operations"] if op["success"]}


def host_digests(host, tree=TREE) -> dict[str, str]:
    out = host.check_output(f"cd {tree} && find . -path ./.cache -prune -o -type f -print0 "
                            "| sort -z | xargs -0r sha256sum")
    return {line.split("  ", 1)[1][2:]: line.split()[0] for line in out.splitlines()}


def local_digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir()}


def test_fresh_fetch_places_every_file_and_keeps_the_token_private(hosts, mirror, served,
                                                                   token_file):
    for host in hosts.values():
        host.run(f"rm -rf {WEIGHTS}")
    result = deploy(mirror, token_file)
    token = token_file.read_text().strip()
    assert token not in result.output
    assert "fetch sandbox/tiny-kimi" in result.output  # progress was reported
    for name, host in hosts.items():
        assert host_digests(host) == local_digests(served)
        secret = host.file("/etc/weights-fetch/hf-token")
        assert (secret.user, secret.mode) == ("root", 0o600)
        assert token not in host.check_output("journalctl -u 'weights-fetch-*' -o cat")
        assert set(mirror[name].sent()) == set(local_digests(served))
        assert host.run("hf version").rc == 0 or host.run("hf --help").rc == 0


def test_second_run_is_a_no_op_and_fast(hosts, mirror, token_file):
    """Also: the token read from a command the operator names (a secret manager's CLI; here
    `cat`) instead of the file is the same token, so nothing changes."""
    started = time.monotonic()
    result = deploy(mirror, token_file, debug=True, weights_hf_token_file=None,
                    weights_hf_token_command=f"cat {token_file}")
    elapsed = time.monotonic() - started
    changed = [op["name"] for op in json.loads(result.stdout)["results"]["operations"]
               if op["success"]]
    assert changed == [] and elapsed < 20, (changed, elapsed)
    for each in mirror.values():
        assert each.sent() == {}
    # One command a host: the preflight asks its facts and those the system and weights steps
    # read, together (tasks/facts_together.py); anything more is a fact asked alone.
    for name in hosts:
        asked = commands_run(result.stderr, name)
        assert len(asked) == 1, "\n".join(asked)


def test_token_is_absent_from_ps_during_the_download(hosts, mirror, token_file):
    for host in hosts.values():
        host.run(f"rm -f {TREE}/{BIG} {TREE}/{BIG2}")
    for each in mirror.values():
        each.call("POST", "/_mirror/faults", {"path": f"{REPO_ID}/{BIG}",
                                              "stall_after_bytes": PIECE, "stall_seconds": 8})
    running = deploy(mirror, token_file, background=True)
    token = token_file.read_text().strip()
    seen_download = False
    while running.poll() is None:
        for host in hosts.values():
            processes = host.check_output("ps -eo args")
            seen_download |= "hf download" in processes
            assert token not in processes
        time.sleep(0.5)
    output = running.stdout.read()
    assert running.returncode == 0, output[-3000:]
    assert seen_download and token not in output


def test_dropped_connection_mid_shard_completes_with_the_right_bytes(hosts, mirror, served,
                                                                     token_file):
    for host in hosts.values():
        host.run(f"rm -f {TREE}/{BIG}")
    for each in mirror.values():
        each.call("POST", "/_mirror/faults", {"path": f"{REPO_ID}/{BIG}",
                                              "drop_after_bytes": PIECE + 4321})
    deploy(mirror, token_file)
    for host in hosts.values():
        assert host_digests(host) == local_digests(served)


def test_killed_client_rerun_completes_without_refetching_or_orphans(hosts, mirror, served,
                                                                     token_file):
    for host in hosts.values():
        host.run(f"rm -f {TREE}/{BIG} {TREE}/{BIG2}")
    for each in mirror.values():
        each.call("POST", "/_mirror/faults", {"path": f"{REPO_ID}/{BIG2}",
                                              "stall_after_bytes": PIECE + 1, "stall_seconds": 60})
    running = deploy(mirror, token_file, background=True)
    deadline = time.monotonic() + 120
    for host in hosts.values():
        while host.run(f"test -s {TREE}/{BIG} && find {TREE}/.cache -name '*.incomplete' "
                       "| grep -q .").rc != 0:
            assert time.monotonic() < deadline, "no partial download to interrupt"
            time.sleep(0.5)
    for host in hosts.values():
        host.run(f"systemctl kill -s KILL {Target('model', '', '', TREE).unit}")
    os.killpg(running.pid, signal.SIGKILL)
    running.wait()
    for host in hosts.values():
        assert host.run(f"find {TREE}/.cache -name '*.incomplete' | grep -q .").rc == 0
    for each in mirror.values():
        each.reset()
    deploy(mirror, token_file)
    for name, host in hosts.items():
        assert host_digests(host) == local_digests(served)
        assert BIG not in mirror[name].sent()  # completed before the kill: not served again
        assert host.run(f"find {TREE}/.cache -name '*.incomplete' | grep -q .").rc != 0


def test_corrupted_shard_is_fetched_again(hosts, mirror, served, token_file):
    for host in hosts.values():
        host.run(f"printf 'garbage' | dd of={TREE}/model-00001-of-00002.safetensors bs=1 "
                 "seek=1000 conv=notrunc status=none")
    deploy(mirror, token_file)
    for name, host in hosts.items():
        assert host_digests(host) == local_digests(served)
        assert set(mirror[name].sent()) == {"model-00001-of-00002.safetensors"}


# Bit rot, or a bad copy: one byte flipped in the middle, the size and mtime kept.
ROT = ("import os, sys; path = sys.argv[1]; st = os.stat(path); f = open(path, 'r+b'); "
       "f.seek(st.st_size // 2); b = f.read(1); f.seek(-1, 1); f.write(bytes([b[0] ^ 255])); "
       "f.close(); os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))")


def scheduled_verify_check(mirror, token_file) -> subprocess.CompletedProcess:
    """The infra check the drift check runs for it, against these hosts."""
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rA",
         "tests/infra/test_host.py", "-k", "scheduled_verify",
         "--inventory", "tests/e2e/hub_inventory.py"],
        cwd=REPO, env=hub_env(mirror, token_file), capture_output=True, text=True, timeout=300)


def test_bit_rot_is_found_by_the_scheduled_verify_and_the_next_deploy_fetches_it(
        hosts, mirror, served, token_file):
    """Fault 6: a deploy and the drift check's plan read sizes and mtimes (a 595 GB tree in a
    second), so a silent change escapes them; the scheduled deep verify re-hashes every file
    at idle priority, keeps what it finds (vLLM may be reading it), and hands it on: its unit
    fails, the drift check names host and file, the next deploy fetches that file alone."""
    target = Target("model", "", "", TREE)
    for host in hosts.values():
        timer = host.service(target.verify_timer)
        assert timer.is_enabled and timer.is_running
        assert host.check_output(f"systemctl show -p IOSchedulingClass --value "
                                 f"{target.verify_unit}") in ("idle", "3")
        host.check_output(f"python3 -c {shlex.quote(ROT)} {TREE}/{BIG}")
    assert changed_operations(deploy(mirror, token_file)) == {}  # unnoticed
    for name, host in hosts.items():
        started = time.monotonic()
        assert host.run(f"systemctl start {target.verify_unit}").rc != 0  # the unit fails
        print(f"\n{name}: scheduled verify of {TREE}: {time.monotonic() - started:.1f} s")
        report = json.loads(host.check_output(f"cat {target.audit_file}"))
        assert (report["state"], report["corrupt"], report["missing"]) == ("failed", [BIG], [])
        assert host.file(f"{TREE}/{BIG}").exists  # kept: the server may be reading it
    plan = json.loads(deploy(mirror, token_file, dry=True).stdout)
    planned = {name for op in plan["plan"] for name in op["hosts_with_change"]}
    assert planned == set(hosts)
    check = scheduled_verify_check(mirror, token_file)
    assert check.returncode == 1, check.stdout[-3000:]
    for name in hosts:
        assert f"scheduled_verify_found_no_corrupt_weights_or_a_deploy_replaced_them[{name}]" \
            in check.stdout
    assert check.stdout.count(f"found corrupt: {BIG}: the next deploy fetches") >= len(hosts)
    deploy(mirror, token_file)
    for name, host in hosts.items():
        assert host_digests(host) == local_digests(served)
        assert set(mirror[name].sent()) == {BIG}
        assert host.run(f"systemctl start {target.verify_unit}").rc == 0
    check = scheduled_verify_check(mirror, token_file)
    assert check.returncode == 0 and check.stdout.count("PASSED") == len(hosts), check.stdout


def test_not_enough_disk_fails_clearly_and_writes_nothing(hosts, mirror, token_file):
    for host in hosts.values():
        host.run("mkdir -p /raid/small && (mountpoint -q /raid/small || "
                 "mount -t tmpfs -o size=4m tmpfs /raid/small)")
    try:
        result = deploy(mirror, token_file, check=False, weights_dir="/raid/small")
        assert result.returncode != 0
        for name, host in hosts.items():
            assert (f"{name}: weights_dir: /raid/small/tiny-kimi (filesystem /raid/small) needs "
                    in result.output)
            assert "GB free" in result.output
            assert host.check_output("find /raid/small -mindepth 1 | wc -l") == "0"
    finally:
        for host in hosts.values():
            host.run("umount /raid/small; rmdir /raid/small")


def test_disk_filling_mid_download_fails_once_clearly_and_keeps_what_is_complete(
        hosts, mirror, served, token_file):
    """Fault 5: the preflight found room, then another writer filled the filesystem while the
    fetch ran. One attempt, one clear error naming the folder and the bytes; partial files
    removed; complete files kept and not fetched again once there is room; vLLM untouched."""
    small, tree = "/raid/small", "/raid/small/tiny-kimi"
    target = Target("model", "", "", tree)
    for host in hosts.values():
        host.check_output(f"mkdir -p {small} && (mountpoint -q {small} || "
                          f"mount -t tmpfs -o size=64m tmpfs {small})")
    serving = {name: service_start(host) for name, host in hosts.items()}
    try:
        for each in mirror.values():
            each.call("POST", "/_mirror/faults", {"path": f"{REPO_ID}/{BIG2}",
                                                  "stall_after_bytes": PIECE + 1,
                                                  "stall_seconds": 20})
        running = deploy(mirror, token_file, background=True, weights_dir=small)
        deadline = time.monotonic() + 120
        for host in hosts.values():
            while host.run(f"find {tree}/.cache -name '*.incomplete' -size +1M "
                           "| grep -q .").rc != 0:
                assert time.monotonic() < deadline and running.poll() is None, \
                    "no download in progress to fill the disk under"
                time.sleep(0.2)
            host.run(f"dd if=/dev/zero of={small}/filler bs=1M status=none")  # until full
        output = running.communicate(timeout=600)[0]
        assert running.returncode != 0, output[-3000:]
        for name, host in hosts.items():
            lines = [line for line in output.splitlines()
                     if name in line and f"no space left for {REPO_ID}@" in line]
            assert lines and f"the filesystem of {tree} has " in lines[0], output[-3000:]
            assert host.run(f"find {small} -name '*.incomplete' | grep -q .").rc != 0
        assert "incomplete after" not in output  # no second attempt into a full disk
        assert {name: service_start(host) for name, host in hosts.items()} == serving
        kept = {name: {path for path, digest in host_digests(host, tree).items()
                       if digest == local_digests(served)[path]}
                for name, host in hosts.items()}
        for name, host in hosts.items():
            host.check_output(f"rm {small}/filler")
            mirror[name].reset()
        deploy(mirror, token_file, weights_dir=small)
        for name, host in hosts.items():
            assert host_digests(host, tree) == local_digests(served)
            assert kept[name] and not kept[name] & set(mirror[name].sent())
    finally:
        for host in hosts.values():
            host.run(f"systemctl disable --now {target.verify_timer}; rm -f "
                     f"/etc/systemd/system/{target.verify_timer} "
                     f"/etc/systemd/system/{target.verify_unit}; systemctl daemon-reload; "
                     f"umount {small}; rmdir {small}")


PEERS = "/raid/hub-peers"  # the fetch-once tests' weights_dir
# Their data: no scheduled verify of a folder the module removes.
PEER_DATA = {"weights_dir": PEERS, "weights_peer_copy": True, "weights_verify_schedule": None}


def fetched_once(hosts, mirror, token_file, during=None) -> tuple[dict[str, dict], float]:
    """A deploy into an empty PEERS with weights_peer_copy on: (bytes each host's mirror
    sent, the deploy's wall time). ``during(running)`` runs while the deploy does."""
    for host in hosts.values():
        host.run(f"rm -rf {PEERS}")
    started = time.monotonic()
    running = deploy(mirror, token_file, background=True, **PEER_DATA)
    if during:
        during(running)
    output = running.communicate(timeout=600)[0]
    assert running.returncode == 0, output[-4000:]
    return {name: each.sent() for name, each in mirror.items()}, time.monotonic() - started


def copied_clean(hosts, served) -> None:
    for host in hosts.values():
        assert host_digests(host, f"{PEERS}/tiny-kimi") == local_digests(served)
        assert host.run(f"find {PEERS} -name '*.incomplete' | grep -q .").rc != 0


def fetch_log(host) -> str:
    unit = Target("model", "", "", f"{PEERS}/tiny-kimi").unit
    return host.check_output(f"journalctl -u {unit} -o cat --no-pager")


def test_the_fleet_fetches_from_the_hub_once_and_copies_tray_to_tray(hosts, mirror, served,
                                                                     token_file):
    """Issue 14, part 3: the first tray fetches from the Hub (its mirror), the others copy
    from it over the trays' own network, each file verified against the Hub's checksum. The
    mirror stalls 8 s in a shard for the first tray, so the others start while it fetches:
    they wait for it and take each file as it is verified."""
    for each in mirror.values():
        each.call("POST", "/_mirror/faults", {"path": f"{REPO_ID}/{BIG}",
                                              "stall_after_bytes": PIECE, "stall_seconds": 8})
    sent, wall = fetched_once(hosts, mirror, token_file)
    copied_clean(hosts, served)
    size = sum(p.stat().st_size for p in served.iterdir())
    # Hub egress: the repository once, all of it to the first tray.
    first, *others = hosts
    assert sum(sum(by_file.values()) for by_file in sent.values()) == size, sent
    assert sum(sent[first].values()) == size and not any(sent[name] for name in others)
    for name in others:
        assert "hf download" not in fetch_log(hosts[name])
    print(f"fetch-once: {len(hosts)} trays, Hub egress {size} bytes (1.0x), {wall:.1f} s")
    # Again: nothing to fetch, copy or restart; the peer servers stay as they are.
    for each in mirror.values():
        each.reset()
    result = deploy(mirror, token_file, **PEER_DATA)
    assert changed_operations(result) == {}
    assert all(each.sent() == {} for each in mirror.values())


def test_a_peer_dying_mid_fetch_leaves_the_others_to_the_hub_and_nothing_corrupt(
        hosts, mirror, served, token_file):
    """The first tray's weights server stops while it is still fetching (its mirror stalls
    20 s in the second big shard): the others have copied what it had verified, fall back to
    the Hub for the rest, and hold the right bytes, with no partial file left."""
    first, *others = hosts
    for each in mirror.values():
        each.call("POST", "/_mirror/faults", {"path": f"{REPO_ID}/{BIG2}",
                                              "stall_after_bytes": PIECE, "stall_seconds": 20})
    tree = f"{PEERS}/tiny-kimi"

    def kill_the_first_peer_once_the_others_copied(running):
        deadline = time.monotonic() + 120
        for name in others:
            while hosts[name].run(f"test -s {tree}/{BIG}").rc != 0:
                assert running.poll() is None and time.monotonic() < deadline
                time.sleep(0.5)
        hosts[first].run("systemctl kill -s KILL weights-peer.service; "
                         "systemctl stop weights-peer.service")

    sent, _ = fetched_once(hosts, mirror, token_file, kill_the_first_peer_once_the_others_copied)
    copied_clean(hosts, served)
    for name in others:
        log = fetch_log(hosts[name])
        assert "the Hub fetches the rest" in log, log[-2000:]
        # What the first tray had verified came from it, not from the Hub.
        assert BIG not in sent[name] and BIG2 in sent[name], sent[name]
    # Back as declared: the next deploy starts the server again.
    deploy(mirror, token_file, **PEER_DATA)
    assert hosts[first].service("weights-peer.service").is_running


def test_no_peer_copy_leaves_no_weights_server(hosts, mirror, token_file):
    deploy(mirror, token_file, **{**PEER_DATA, "weights_peer_copy": False})
    for host in hosts.values():
        assert not host.file("/etc/systemd/system/weights-peer.service").exists
        host.run(f"rm -rf {PEERS}")


def test_wrong_revision_fails_clearly(hosts, mirror, token_file):
    result = deploy(mirror, token_file, check=False, model_revision="0" * 40)
    assert result.returncode != 0
    assert f"model_revision: revision '{'0' * 40}' not found in {REPO_ID}" in result.output
    assert "Traceback" not in result.output


def overlapped_with_the_runtime(hosts, mirrors, token_file, data) -> None:
    """The whole runbook's first fetch into a new folder, from a slow mirror (a byte a second
    inside a shard, for as long as the runtime's step takes: a venv built from nothing takes
    minutes): the fetch unit starts before the runtime's step and is still downloading when
    the deploy, the runtime done, starts waiting for it (issue 14, part 4); then the mirror
    goes fast again and the deploy completes. (The client writes in 10 MB pieces: the
    trickle shows no progress on disk, so `data` must give the fetch's watchdog longer than
    the runtime step takes.)"""
    shard = "model-00001-of-00002.safetensors"
    for mirror in mirrors.values():
        mirror.call("POST", "/_mirror/faults", {"path": f"{REPO_ID}/{shard}", "trickle": True,
                                                "stall_after_bytes": 1000, "stall_seconds": 900})
    unit = Target("model", "", "", f"{data['weights_dir']}/tiny-kimi").unit
    running = deploy(mirrors, token_file, full=True, background=True, **data)
    seen, downloading = [], {}
    try:
        for line in running.stdout:
            seen.append(line)
            if "Starting operation: Model weights | Wait for the model fetch" in line:
                downloading = {name: host.run(f"systemctl is-active -q {unit}").rc == 0
                               for name, host in hosts.items()}
                for mirror in mirrors.values():
                    mirror.call("DELETE", "/_mirror/faults")
    finally:
        for mirror in mirrors.values():
            mirror.call("DELETE", "/_mirror/faults")
    output = "".join(seen)
    assert running.wait() == 0, output[-4000:]
    marks = [output.index(f"Starting operation: {name}") for name in (
        "Model weights | Fetch model", "vLLM venv |", "Model weights | Wait for the model fetch",
        "vLLM service |")]
    assert marks == sorted(marks), output[-4000:]
    assert downloading and all(downloading.values()), downloading


def test_changed_revision_restarts_vllm_exactly_once(hosts, mirrors, tmp_path_factory,
                                                     token_file, sandbox):
    """The whole runbook, weights into a folder of their own: first from the mirror at
    revision A (the pushed model's bytes), then B (one changed file): one restart, then none.

    (Fetching into the folder the push path filled, /raid/models, re-fetched the small
    non-LFS files once more on the run after the switch: an open bug, see the README.)"""
    folder = tmp_path_factory.mktemp("rev")
    for path in (REPO / ".cache" / "tiny-model").iterdir():
        shutil.copy2(path, folder / path.name)
    workdir = tmp_path_factory.mktemp("rev-mirrors")
    started = serve_on_every_tray(sandbox, workdir, folder, token_file)
    try:
        data = {"weights_dir": "/raid/hub-revisions", "weights_stall_timeout_s": 900}
        overlapped_with_the_runtime(hosts, started, token_file, data)
        before = {name: service_start(host) for name, host in hosts.items()}
        again = deploy(started, token_file, full=True, **data)
        assert changed_operations(again) == {}
        assert {name: service_start(host) for name, host in hosts.items()} == before
        stop_running(started)
        generation = json.loads((folder / "generation_config.json").read_text())
        (folder / "generation_config.json").write_text(json.dumps({**generation,
                                                                   "temperature": 0.7}))
        started = serve_on_every_tray(sandbox, workdir, folder, token_file)
        deploy(started, token_file, full=True, **data)
        after = {name: service_start(host) for name, host in hosts.items()}
        assert all(after[name] != before[name] for name in hosts)
        again = deploy(started, token_file, full=True, **data)
        assert changed_operations(again) == {}
        assert {name: service_start(host) for name, host in hosts.items()} == after
    finally:
        stop_running(started)


def test_a_broken_hub_revision_is_rolled_back_with_the_clients_records(hosts, tmp_path_factory,
                                                                        token_file, sandbox):
    """Fault 4 on the Hub path: the repository's next commit has a shard vLLM cannot load
    (its bytes are what the Hub says they are: the fetch verifies it). The whole runbook
    fetches it, restarts, sees /health fail, and puts the last good release back on every
    tray: the weights (kept as hard links), the Hub client's records and the fetch's state
    (copied). The deploy fails naming each host; the old release serves. Once the commit is
    fixed, the next deploy changes nothing: the records put back say the folder already holds
    it, so nothing is fetched again and nothing restarts."""
    folder = tmp_path_factory.mktemp("broken-rev")
    for path in (REPO / ".cache" / "tiny-model").iterdir():
        shutil.copy2(path, folder / path.name)
    workdir = tmp_path_factory.mktemp("broken-rev-mirrors")
    data = {"weights_dir": "/raid/hub-rollback", "weights_stall_timeout_s": 900}
    tree, key = f"{data['weights_dir']}/tiny-kimi", Path(sandbox["api_key_file"]).read_text()
    addresses = {h["name"]: h["address"] for h in sandbox["hosts"]}

    started = serve_on_every_tray(sandbox, workdir, folder, token_file)
    try:
        deploy(started, token_file, full=True, **data)
        good = {name: host_digests(host, tree) for name, host in hosts.items()}
        stop_running(started)
        shard = sorted(folder.glob("*.safetensors"))[0]
        kept_bytes = shard.read_bytes()
        shard.write_bytes(b"\xff" * len(kept_bytes))  # a header length no file can have
        started = serve_on_every_tray(sandbox, workdir, folder, token_file)
        since = time.monotonic()
        failed = deploy(started, token_file, check=False, full=True, **data)
        took = time.monotonic() - since
        print(f"\na broken Hub revision on {len(hosts)} trays: deploy failed after {took:.0f}s, "
              "the last good release serving on each")
        assert failed.returncode != 0, failed.output[-4000:]
        for name, host in hosts.items():
            assert f"{name}: weights {tree} put back" in failed.output, failed.output[-4000:]
            assert f"{name}: the last good release serves again" in failed.output
            assert host_digests(host, tree) == good[name]
            leftovers = host.check_output(f"ls -A {data['weights_dir']}").split()
            assert sorted(leftovers) == [".tiny-kimi.last-good", "tiny-kimi"]
            status, body = chat(addresses[name], key.strip())
            assert status == 200 and body["usage"]["completion_tokens"] > 0
        restored = {name: service_start(host) for name, host in hosts.items()}
        stop_running(started)
        shard.write_bytes(kept_bytes)
        started = serve_on_every_tray(sandbox, workdir, folder, token_file)
        again = deploy(started, token_file, full=True, **data)
        assert changed_operations(again) == {}
        assert {name: service_start(host) for name, host in hosts.items()} == restored
        for mirror in started.values():
            assert mirror.sent() == {}
    finally:
        stop_running(started)
