"""Faults the hosts survive on their own, with no deploy: vLLM killed outright, its engine
process alone killed (the API server then exits 0: why the unit says Restart=always), the tray
shut down and booted, and its power cut; a deploy killed between its change and the
restart, and one killed in the middle of building a new venv; and a release whose model
folder is wrong, rolled back with its weights. Each test measures the time
back to serving and prints it (the README's faults table). Runs on the converged trays after the infra suite (name
order), on the last tray, out of the others' way."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tasks.data_keys import DEFAULTS
from tasks.operations import VENV_COMPLETE, wheelhouse_lock_digest
from tasks.settings import controller_path
from tasks.vllm_service import RESTART_MARK, UNIT_PATH
from tests.e2e.common import (ENV, PYINFRA, SANDBOX, api_key, chat, deploy_killed_when,
                              drift_check, exec_start, sandbox_tool, service_start)
from tests.helpers import REPO, group_data

HEALTH_WAIT_S = 600


def restarts(host) -> int:
    return int(host.check_output("systemctl show --value -p NRestarts vllm"))


def main_pid(host) -> int:
    return int(host.check_output("systemctl show --value -p MainPID vllm"))


def back_to_serving(host, address: str, key: str, since: float, count: int) -> float:
    """Seconds from `since` until systemd restarted vllm.service (its restart counter passed
    `count`: the old server may answer for a moment after its engine died), /health answers on
    the host and a chat completion answers from the controller."""
    deadline = since + HEALTH_WAIT_S
    while restarts(host) <= count:
        assert time.monotonic() < deadline, "systemd did not restart vllm.service"
        time.sleep(0.5)
    while host.run("curl -fs -o /dev/null --max-time 5 http://127.0.0.1:8000/health").rc != 0:
        assert time.monotonic() < deadline, \
            f"vllm.service did not answer /health within {HEALTH_WAIT_S}s"
        time.sleep(1)
    status, body = chat(address, key)
    assert status == 200 and body["usage"]["completion_tokens"] > 0
    return time.monotonic() - since


def killed_and_back(hosts, sandbox, victim) -> tuple[str, float]:
    """SIGKILL the process `victim(host, main PID)` names on the last tray; then the tray's
    name and the seconds until it serves again, systemd having restarted vllm.service once."""
    tray = sandbox["hosts"][-1]
    host = hosts[tray["name"]]
    count, pid = restarts(host), main_pid(host)
    host.check_output(f"kill -KILL {victim(host, pid)}")
    took = back_to_serving(host, tray["address"], api_key(sandbox), time.monotonic(), count)
    assert restarts(host) == count + 1
    assert main_pid(host) != pid
    return tray["name"], took


def test_vllm_killed_with_sigkill_serves_again_without_a_deploy(hosts, sandbox):
    name, took = killed_and_back(hosts, sandbox, lambda host, pid: pid)
    print(f"\nvLLM SIGKILLed on {name}: serving again after {took:.0f}s")


def engine_core(host, pid: int) -> int:
    found = host.check_output(f"ps -o pid=,args= --ppid {pid} | grep -F EngineCore "
                              "| awk '{print $1}'")
    assert found.isdigit(), f"no engine core process under {pid}: {found!r}"
    return int(found)


def test_the_engine_process_killed_alone_serves_again_without_a_deploy(hosts, sandbox):
    """The engine core is a child of the API server (`VLLM::EngineCore`); killed, it takes
    the server down with it (exit 0), and Restart=always brings both back."""
    name, took = killed_and_back(hosts, sandbox, engine_core)
    print(f"\nvLLM's engine core SIGKILLed on {name}: serving again after {took:.0f}s")


def drift_of(name: str, out) -> tuple[str, str]:
    """drift-check over the whole inventory: `name`'s status, and what it printed."""
    _, output, report = drift_check(out)
    return report["hosts"][name]["status"], output[-6000:]


@pytest.fixture(scope="module")
def converged_tray(sandbox, tmp_path_factory) -> dict:
    """The last tray deployed as the inventory declares it (the Hub module before this one
    left the trays on its own data), and in sync by the drift check."""
    tray = sandbox["hosts"][-1]
    deployed = subprocess.run([PYINFRA, "-y", "--limit", tray["name"], "inventories/sandbox.py",
                               "deploy.py"], cwd=REPO, env=ENV, capture_output=True, text=True,
                              timeout=1500, stdin=subprocess.DEVNULL)
    assert deployed.returncode == 0, deployed.stdout[-3000:] + deployed.stderr[-3000:]
    status, output = drift_of(tray["name"], tmp_path_factory.mktemp("drift"))
    assert status == "in_sync", output
    return tray


@pytest.mark.parametrize("how", ["shutdown", "power-cut"])
def test_a_tray_booted_again_serves_with_no_deploy_and_no_drift(hosts, sandbox, converged_tray,
                                                                tmp_path, how):
    """A clean shutdown and boot (vLLM drains on the way down), and the power cut (the host's
    every process killed at once, nothing flushed): vllm.service is enabled, so it starts at
    boot; the drift check then finds the tray as the deploy left it."""
    tray = converged_tray
    host = hosts[tray["name"]]
    since = time.monotonic()
    rebooted = sandbox_tool("reboot", tray["name"], *(["--power-cut"] if how == "power-cut"
                                                      else []))
    assert rebooted.returncode == 0, rebooted.stdout + rebooted.stderr
    took = back_to_serving(host, tray["address"], api_key(sandbox), since, -1)
    print(f"\n{tray['name']} {how} and boot: serving again after {took:.0f}s")
    assert restarts(host) == 0, "vllm.service started at boot, not by a restart"
    status, output = drift_of(tray["name"], tmp_path)
    assert status == "in_sync", output


def test_a_deploy_killed_between_its_change_and_the_restart_is_finished_by_the_next(
        hosts, sandbox, converged_tray, tmp_path):
    """Fault 3: the deploy (pyinfra's whole process group) SIGKILLed right after it wrote a
    changed unit, before the restart: the old release keeps serving, and the next run, which
    finds nothing left to change on disk, still restarts vLLM once (the restart mark), so the
    server runs what the unit says. A watcher on the tray names the moment the unit changes."""
    tray = converged_tray
    host, name = hosts[tray["name"]], tray["name"]
    changed = "--shutdown-timeout 29"
    deploy = [PYINFRA, "-y", "--limit", name, "--data", "vllm_shutdown_timeout_s=29",
              "inventories/sandbox.py", "deploy.py"]
    before = service_start(host)
    deploy_killed_when(SANDBOX, name, f"grep -qF -- '{changed}' {UNIT_PATH}", deploy, ENV,
                       "it changed the unit", poll_s=0.005)
    assert host.file(RESTART_MARK).exists
    assert service_start(host) == before, "the kill came after the restart had begun"
    status, body = chat(tray["address"], api_key(sandbox))  # the old release serves
    assert status == 200 and body["usage"]["completion_tokens"] > 0
    rerun = subprocess.run(deploy, cwd=REPO, env=ENV, capture_output=True, text=True,
                           timeout=1500, stdin=subprocess.DEVNULL)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert "a run was stopped before it restarted vllm.service" in rerun.stdout + rerun.stderr
    assert service_start(host) != before and changed in exec_start(host)
    assert not host.file(RESTART_MARK).exists
    # Back to the inventory's own data: one more restart, and in sync.
    back = subprocess.run(deploy[:4] + deploy[6:], cwd=REPO, env=ENV, capture_output=True,
                          text=True, timeout=1500, stdin=subprocess.DEVNULL)
    assert back.returncode == 0, back.stdout[-3000:] + back.stderr[-3000:]
    status, output = drift_of(name, tmp_path)
    assert status == "in_sync", output


def rebuilt_wheelhouse(folder) -> str:
    """A copy of the sandbox's vLLM wheelhouse (its wheels linked) whose lock says one word
    more in its first line, a comment: the same packages under another lock digest, so the
    deploy builds a new venv (~1-2 min on a tray) and restarts vLLM on it."""
    source = Path(controller_path(group_data("sandbox")["vllm_wheelhouse_dir"]))
    folder.mkdir()
    for wheel in source.glob("*.whl"):
        (folder / wheel.name).symlink_to(wheel)
    header, rest = (source / "requirements.lock").read_text().split("\n", 1)
    (folder / "requirements.lock").write_text(f"{header} rebuilt-by-e2e\n{rest}")
    return str(folder)


def test_a_deploy_killed_mid_venv_build_keeps_serving_and_the_next_one_finishes(
        hosts, sandbox, converged_tray, tmp_path):
    """Fault 3, mid-build: a new vLLM venv is built beside the one serving; the deploy's whole
    process group SIGKILLed once pip has installed a few packages into it (a watcher on the
    tray says when). The old release keeps serving, unrestarted, its link untouched, the new
    venv unmarked. The pip the kill left running on the tray goes on (it holds the build
    lock): the next run waits for it before it touches the staging folder (CI caught the
    run before this pushing wheels that the orphan's clean-up then removed), uses its venv if
    it ended well or builds again, switches, restarts once and leaves no staging folder;
    back to the inventory's data, the kept venv is switched back to without a rebuild."""
    tray = converged_tray
    host, name = hosts[tray["name"]], tray["name"]
    link = DEFAULTS["vllm_venv_dir"]
    wheelhouse = rebuilt_wheelhouse(tmp_path / "wheelhouse")
    target = f"{link}-{wheelhouse_lock_digest(wheelhouse)[:16]}"
    deploy = [PYINFRA, "-y", "--limit", name, "--data", f"vllm_wheelhouse_dir={wheelhouse}",
              "inventories/sandbox.py", "deploy.py"]
    old, before = host.file(link).linked_to, service_start(host)
    old_python = host.check_output(f"stat -c %i {old}/bin/python3")
    deploy_killed_when(
        SANDBOX, name, f"[ $(ls -d {target}/lib/python3*/site-packages/*.dist-info 2>/dev/null "
        "| wc -l) -ge 5 ]", deploy, ENV, f"pip installed into {target}")
    left = host.run(f"pgrep -f -- {target}/bin/pip").stdout.split()
    print(f"\ndeploy killed mid-build on {name}: processes of its build left running (flock, sh, "
          f"pip): {len(left)}")
    assert host.file(link).linked_to == old
    assert not host.file(f"{target}/{VENV_COMPLETE}").exists
    assert service_start(host) == before
    status, body = chat(tray["address"], api_key(sandbox))  # the old release serves
    assert status == 200 and body["usage"]["completion_tokens"] > 0
    since = time.monotonic()
    rerun = subprocess.run(deploy, cwd=REPO, env=ENV, capture_output=True, text=True,
                           timeout=1500, stdin=subprocess.DEVNULL)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    print(f"the next run switched to the venv and served on it after "
          f"{time.monotonic() - since:.0f}s")
    assert host.file(link).linked_to == target
    assert host.file(f"{target}/{VENV_COMPLETE}").exists
    assert host.check_output(f"ls -d {link}-*.wheels 2>/dev/null || true") == ""
    assert service_start(host) != before
    status, body = chat(tray["address"], api_key(sandbox))
    assert status == 200 and body["usage"]["completion_tokens"] > 0
    back = subprocess.run(deploy[:4] + deploy[6:], cwd=REPO, env=ENV, capture_output=True,
                          text=True, timeout=1500, stdin=subprocess.DEVNULL)
    assert back.returncode == 0, back.stdout[-3000:] + back.stderr[-3000:]
    assert host.file(link).linked_to == old
    assert host.check_output(f"stat -c %i {old}/bin/python3") == old_python, "rebuilt"
    status, output = drift_of(name, tmp_path)
    assert status == "in_sync", output


def lfs_checkout(source: Path, folder: Path) -> str:
    """A copy of the model folder as `git clone` leaves it without git-lfs: config.json and
    the tokenizer right, every shard a ~130-byte LFS pointer. The preflight accepts it (it
    looks for config.json); vLLM cannot load it."""
    shutil.copytree(source, folder)
    for shard in folder.glob("*.safetensors"):
        digest = hashlib.sha256(shard.read_bytes()).hexdigest()
        shard.write_text(f"version https://git-lfs.github.com/spec/v1\noid sha256:{digest}\n"
                         f"size {shard.stat().st_size}\n")
    return str(folder)


def test_a_release_with_a_wrong_model_folder_is_rolled_back_weights_and_all(
        hosts, sandbox, converged_tray, tmp_path):
    """Fault 4, a wrong model path: model_source_dir names an LFS-less checkout, so the push
    replaces the shards the tray serves with pointer files. vLLM fails to load them; the
    deploy puts the last good release back, its weights too (kept as hard links beside the
    folder, as a Hub revision would be), sees it serve, and fails naming host and cause.
    The tray is down only from the restart until the old release has loaded again."""
    tray = converged_tray
    host, name = hosts[tray["name"]], tray["name"]
    data = group_data("sandbox")
    model_dir = f"{data.get('weights_dir', DEFAULTS['weights_dir'])}/tiny-kimi"
    shards = f"sha256sum {model_dir}/*.safetensors"
    good, before = host.check_output(shards), exec_start(host)
    wrong = lfs_checkout(Path(controller_path(data["model_source_dir"])), tmp_path / "checkout")
    since = time.monotonic()
    failed = subprocess.run([PYINFRA, "-y", "--limit", name, "--data",
                             f"model_source_dir={wrong}", "inventories/sandbox.py", "deploy.py"],
                            cwd=REPO, env=ENV, capture_output=True, text=True, timeout=1500,
                            stdin=subprocess.DEVNULL)
    took = back_to_serving(host, tray["address"], api_key(sandbox), since, -1)
    output = failed.stdout + failed.stderr
    print(f"\n{name}: a wrong model folder: deploy failed after {took:.0f}s, the last good "
          "release serving")
    assert failed.returncode != 0, output[-3000:]
    assert f"{name}: weights {model_dir} put back" in output, output[-3000:]
    assert f"{name}: the last good release serves again" in output, output[-3000:]
    # The cause, from vLLM's log: its last lines are the API server's "see root cause above".
    header = f"{name}: the first exceptions vllm.service logged since the restart:"
    assert header in output and "safetensor" in output.split(header)[1].lower(), output[-8000:]
    named = output.split(header)[1].split(f"{name}: restoring")[0]
    print(f"the exceptions the deploy named:\n{named.rstrip()}")
    assert host.check_output(shards) == good and exec_start(host) == before
    leftovers = host.check_output(f"ls -A {Path(model_dir).parent}").split()
    assert sorted(leftovers) == [".tiny-kimi.last-good", "tiny-kimi"]
    status, body = chat(tray["address"], api_key(sandbox))
    assert status == 200 and body["usage"]["completion_tokens"] > 0
    # The old release was just started on what it reads: no restart is due any more.
    assert not host.file(RESTART_MARK).exists
    restored = service_start(host)
    back = subprocess.run([PYINFRA, "-y", "--limit", name, "inventories/sandbox.py",
                           "deploy.py"], cwd=REPO, env=ENV, capture_output=True, text=True,
                          timeout=1500, stdin=subprocess.DEVNULL)
    assert back.returncode == 0, back.stdout[-3000:] + back.stderr[-3000:]
    assert service_start(host) == restored
    status, output = drift_of(name, tmp_path)
    assert status == "in_sync", output
