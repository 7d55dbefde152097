"""The whole GB200 plan, both runtimes, against @fake hosts that answer as the seed's tray.

gb200-dry-run (harness/gb200_dry_run.py) runs `pyinfra harness/gb200_fake_inventory.py
deploy.py --dry` in its own process (pyinfra's CLI patches gevent: never loaded here): the hosts
of inventories/gb200.py as @fake hosts, the Hub served by hub-mirror on 127.0.0.1 (a
Kimi-K2.6-shaped repo of sparse files); it reads back both pyinfra's JSON plan
(`hosts_with_change` per operation) and every planned command.
"""

from __future__ import annotations

import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

from tasks.facts import CpuArchitecture, DockerImage, FreeBytes, NvidiaGpus
from tests.helpers import REPO

TRAYS = ["@fake/gb200-tray-01", "@fake/gb200-tray-02"]
DRIFT = "@fake/drift-control-01"
ROUTER = "@fake/gb200-router-01"
K8S = "@fake/k8s-control-01"
IMAGE = "vllm/vllm-openai:v0.19.1-cu130"
PREFLIGHT = "Preflight | Check data, GPUs, disk and port"
HUB_CHECK = "Model weights | Check Hub revision and free space for the weights"
FETCH = "Model weights | Fetch model moonshotai/Kimi-K2.6@main into /raid/models/kimi-k2.6"
WAIT = "Model weights | Wait for the model fetch into /raid/models/kimi-k2.6"
MANIFEST_DIR = "/etc/vllm-kubernetes"


def dry_run(runtime: str, tmp_path: Path) -> dict:
    commands_file = tmp_path / f"commands-{runtime}.json"
    env = {key: value for key, value in os.environ.items()
           if key not in ("HF_TOKEN", "GB200_FAKE", "GB200_FAKE_RUNTIME")}
    result = subprocess.run(
        [sys.executable, "-m", "harness.gb200_dry_run", "--runtime", runtime, "--json",
         "--commands", str(commands_file)],
        cwd=REPO, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=120)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    plan = json.loads(result.stdout)["plan"]
    return {"changes": {op["name"]: op["hosts_with_change"] for op in plan},
            "commands": json.loads(commands_file.read_text()), "log": result.stderr}


@pytest.fixture(scope="module")
def docker(tmp_path_factory) -> dict:
    return dry_run("docker", tmp_path_factory.mktemp("docker"))


@pytest.fixture(scope="module")
def kubernetes(tmp_path_factory) -> dict:
    return dry_run("kubernetes", tmp_path_factory.mktemp("kubernetes"))


def ops_of(run: dict, host: str) -> dict[str, list[str]]:
    """{operation: commands} planned on one host."""
    return run["commands"][host]


def hosts_changed(run: dict, prefix: str) -> set[str]:
    return {host for name, hosts in run["changes"].items() if name.startswith(prefix)
            for host in hosts}


# ---- the fake hosts ------------------------------------------------------------------------

def load_inventory(monkeypatch, inventory: str = "inventories/gb200.py", **env) -> dict:
    """An inventory file's groups, the file executed by path as pyinfra executes it."""
    for key in ("GB200_FAKE", "GB200_FAKE_RUNTIME"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    values = runpy.run_path(str(REPO / inventory))
    return {key: value for key, value in values.items()
            if not key.startswith("_") and isinstance(value, (list, tuple))}


def test_production_inventory_declares_real_hosts_and_no_k8s_control_for_docker(monkeypatch):
    groups = load_inventory(monkeypatch)
    assert sorted(groups) == ["drift_control", "gb200", "k8s_control", "router"]
    assert [name for name, _ in groups["gb200"]] == ["gb200-tray-01", "gb200-tray-02"]
    assert [name for name, _ in groups["router"]] == ["gb200-router-01"]
    assert all(data["ssh_hostname"].startswith("198.51.100.") for _, data in groups["gb200"])
    # The GB200 default runtime is docker: a control host would refuse docker trays.
    assert groups["k8s_control"] == []


def test_fake_inventory_answers_the_seed_tray_facts(monkeypatch):
    groups = load_inventory(monkeypatch, "harness/gb200_fake_inventory.py",
                            GB200_FAKE_RUNTIME="kubernetes")
    assert [name for name, _ in groups["gb200"]] == TRAYS
    assert [name for name, _ in groups["k8s_control"]] == [K8S]
    # Kubernetes serves through its Service: no router in front of pods.
    assert groups["router"] == []
    (_, tray), (_, control) = groups["gb200"][0], groups["k8s_control"][0]
    assert not any(key.startswith("ssh_") for key in tray)
    assert tray["vllm_runtime"] == "kubernetes" and tray["fake_delay"] == 0
    answers = tray["fake_responses"]

    def answer(command: str) -> list[str] | None:
        return next((lines for key, lines in answers.items() if key in command), None)

    assert answer(CpuArchitecture().command()) == ["aarch64"]
    gpus = NvidiaGpus().process(answer(NvidiaGpus().command()))
    assert [gpu["name"] for gpu in gpus] == ["NVIDIA GB200"] * 4
    # FreeBytes is asked about weights_dir and each model folder: one answer, /raid.
    for path in ("/raid/models", "/raid/models/kimi-k2.6"):
        free = FreeBytes().process(answer(FreeBytes().command(path=path).get_raw_value()))
        assert free["mount"] == "/raid" and free["free_bytes"] > 595 * 10**9
    assert DockerImage().process(
        answer(DockerImage().command(reference=IMAGE).get_raw_value())) is None
    # Not a tray: answers nothing, a bare host.
    assert control["fake_responses"] == {}


# ---- docker, the GB200 default ---------------------------------------------------------------

def test_docker_preflight_and_hub_check_pass_on_both_trays(docker):
    assert "preflight:" not in docker["log"] and "weights:" not in docker["log"]
    assert docker["changes"][PREFLIGHT] == [] and docker["changes"][HUB_CHECK] == []
    # Past the preflight: the steps after it are planned on both trays.
    assert docker["changes"]["System | Install host packages"] == TRAYS


def test_docker_installs_docker_and_the_nvidia_container_toolkit(docker):
    name = "NVIDIA container host | Install Docker and the NVIDIA Container Toolkit"
    assert docker["changes"][name] == TRAYS
    for tray in TRAYS:
        (install,) = ops_of(docker, tray)[name]
        assert install.endswith("install docker.io nvidia-container-toolkit")


def test_docker_pulls_the_pinned_image_for_arm64(docker):
    name = f"vLLM container image | Image {IMAGE} present (pulled)"
    assert docker["changes"][name] == TRAYS
    for tray in TRAYS:
        pull = ops_of(docker, tray)[name][0]
        assert pull == f"docker pull --quiet --platform linux/arm64 {IMAGE}"


def test_docker_fetches_the_weights_then_runs_and_waits_for_vllm_service(docker):
    for tray in TRAYS:
        ops = list(ops_of(docker, tray))
        fetch = ops_of(docker, tray)[FETCH]
        assert any(command.startswith("upload /var/lib/weights-fetch/kimi-k2.6-")
                   and command.endswith("/job.json") for command in fetch)
        assert any("systemd-run --unit=weights-fetch-kimi-k2.6-" in command
                   for command in fetch)
        unit = "vLLM service | Install vllm.service unit (docker runtime)"
        start = "vLLM service | Enable and start vllm.service, restart if its inputs changed"
        health = "vLLM service | Wait for vLLM /health"
        assert "upload /etc/systemd/system/vllm.service" in ops_of(docker, tray)[unit]
        assert "systemctl start vllm.service" in ops_of(docker, tray)[start]
        assert "http://127.0.0.1:8000/health" in ops_of(docker, tray)[health][0]
        assert ops.index(FETCH) < ops.index(unit) < ops.index(start) < ops.index(health)


def test_docker_pulls_the_image_while_the_weights_download_and_waits_before_the_unit(docker):
    """The critical path (issue 14, part 4): the 595 GB fetch starts in its own unit before
    Docker, the NVIDIA toolkit and the ~20 GB image, which run while it downloads; the deploy
    waits for it only before vllm.service, which needs the weights."""
    toolkit = "NVIDIA container host | Install Docker and the NVIDIA Container Toolkit"
    image = f"vLLM container image | Image {IMAGE} present (pulled)"
    unit = "vLLM service | Install vllm.service unit (docker runtime)"
    for tray in TRAYS:
        ops = list(ops_of(docker, tray))
        assert ops.index(FETCH) < ops.index(toolkit) < ops.index(image) < ops.index(WAIT) \
            < ops.index(unit)
        assert ops_of(docker, tray)[WAIT] == ["call _follow"]
        assert not [command for command in ops_of(docker, tray)[FETCH] if "_follow" in command]


def test_every_tray_serves_its_weights_to_its_peers_before_any_fetch_starts(docker):
    """weights_peer_copy (group_data/gb200.py): the server each tray's peers copy from is
    installed and started before the fetch, whose job names them (tests/unit/test_weights.py:
    the tree of peers; the operation cases: the job)."""
    install = "Model weights | Install weights-peer.service (this host's weights to its peers)"
    start = "Model weights | Enable and start weights-peer.service, restart it if it changed"
    for tray in TRAYS:
        ops = ops_of(docker, tray)
        assert "upload /etc/systemd/system/weights-peer.service" in ops[install]
        assert "systemctl start weights-peer.service" in ops[start]
        assert list(ops).index(install) < list(ops).index(start) < list(ops).index(FETCH)


def test_docker_keeps_the_release_that_answered_and_would_restore_it(docker):
    keep = "vLLM service | Keep the release that now serves as the last good one"
    health = "vLLM service | Wait for vLLM /health"
    for tray in TRAYS:
        ops = list(ops_of(docker, tray))
        assert ops.index(health) < ops.index(keep)
        assert "mv /var/lib/vllm-release.new /var/lib/vllm-release" in ops_of(docker, tray)[keep][0]
        assert f"{tray}: restoring the last good release" in ops_of(docker, tray)[health][0]


def test_the_roll_out_of_a_first_deploy_is_a_canary_then_batches_behind_the_router():
    env = {key: value for key, value in os.environ.items()
           if key not in ("HF_TOKEN", "GB200_FAKE", "GB200_FAKE_RUNTIME")}
    result = subprocess.run(
        [sys.executable, "-m", "harness.gb200_dry_run", "--rollout", "--data",
         "vllm_rollout_batch=4"],
        cwd=REPO, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=120)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.splitlines() == [
        f"rollout: 2 tray(s) restart vLLM, in 2 batch(es) (canary 1, then 4): {TRAYS[0]}, "
        f"{TRAYS[1]}; other changes: {ROUTER}, {DRIFT}",
        f"rollout:   batch 1/2 (canary): {TRAYS[0]} (out of {ROUTER} while it restarts)",
        f"rollout:   batch 2/2: {TRAYS[1]} (out of {ROUTER} while it restarts)"]


def test_docker_drift_host_plans_its_timer_and_nothing_else(docker):
    timer = "Drift check schedule | Install drift-check.timer unit"
    assert docker["changes"][timer] == [DRIFT]
    assert "systemctl enable drift-check.timer" in ops_of(docker, DRIFT)[
        "Drift check schedule | Enable and start drift-check.timer, reload systemd if a unit "
        "changed"]
    assert all(name.startswith("Drift check schedule |") for name in ops_of(docker, DRIFT))
    assert hosts_changed(docker, "Drift check schedule |") == {DRIFT}


def test_docker_has_no_kubernetes_control_host(docker):
    assert K8S not in docker["commands"]
    assert hosts_changed(docker, "vLLM on Kubernetes |") == set()


# ---- kubernetes ------------------------------------------------------------------------------

def test_kubernetes_trays_stop_after_the_weights(kubernetes):
    assert "preflight:" not in kubernetes["log"] and "weights:" not in kubernetes["log"]
    assert kubernetes["changes"][PREFLIGHT] == [] and kubernetes["changes"][HUB_CHECK] == []
    assert kubernetes["changes"][FETCH] == TRAYS
    for tray in TRAYS:
        ops = list(ops_of(kubernetes, tray))
        # The fetch started, its deep verify scheduled, then the wait: the tray's last step.
        assert ops.index(FETCH) < [index for index, name in enumerate(ops) if name.startswith(
            "Model weights | Enable and start weights-verify-kimi-k2.6-")][0]
        assert ops[-1] == WAIT
        assert ops_of(kubernetes, tray)[WAIT] == ["call _follow"]
        assert not [name for name in ops if name.startswith(
            ("vLLM service |", "vLLM container image |", "NVIDIA container host |"))]


def test_kubernetes_control_host_installs_the_objects_and_applies_them(kubernetes):
    ops = ops_of(kubernetes, K8S)
    installed = {name.rsplit("/", 1)[1] for name in ops
                 if name.startswith("vLLM on Kubernetes | Install Kubernetes")}
    assert installed == {"resourceclaimtemplate.yaml", "secret.yaml", "deployment.yaml",
                         "service.yaml"}
    apply_name = ("vLLM on Kubernetes | Apply the Kubernetes objects, wait for "
                  "deployment/kimi-k26 to roll out")
    assert kubernetes["changes"][apply_name] == [K8S]
    apply, rollout = ops[apply_name]
    assert apply.startswith("kubectl apply --server-side --force-conflicts "
                            "--field-manager=kimi-gb200 -n default ")
    assert f"-f {MANIFEST_DIR}/deployment.yaml" in apply
    assert "kubectl -n default rollout status deployment/kimi-k26" in rollout
    # The control host gets objects, never weights or a server.
    assert all(name.startswith("vLLM on Kubernetes |") for name in ops)
    assert hosts_changed(kubernetes, "vLLM on Kubernetes |") == {K8S}


# ---- bad data: the preflight's lines and a failing status, never a traceback -----------------

REFUSED = "gb200-dry-run: the preflight refuses the deploy (a real run stops before any change):"
BAD_DATA = [
    ("model_profile=kimi-k3", "model_profile: found 'kimi-k3'; need one of ['kimi-k2.6', "),
    ("model_draft_repo=", "model_draft_repo: found ''; need a Hub repo id like owner/name"),
    ("vllm_runtime=kubernetes", "vllm_runtime: found 'kubernetes' and no host in group "
                                "k8s_control; need a k8s_control host"),
    ("vllm_tensor_parallel_size=1", "vllm_tensor_parallel_size: found 1 x 199 GB x 0.90 = 179 "
                                    "GB usable; need >= 595 GB to hold kimi-k2.6's weights"),
]


@pytest.mark.parametrize("data,says", BAD_DATA, ids=[data for data, _ in BAD_DATA])
def test_bad_data_fails_with_the_preflights_lines_and_no_traceback(data, says):
    """An unknown profile or an empty draft repo once crashed the tool; kubernetes trays with no
    control host and tensor parallel 1 on a tray (the override on) once planned as if fine."""
    env = {key: value for key, value in os.environ.items()
           if key not in ("HF_TOKEN", "GB200_FAKE", "GB200_FAKE_RUNTIME")}
    result = subprocess.run([sys.executable, "-m", "harness.gb200_dry_run", "--data", data],
                            cwd=REPO, env=env, capture_output=True, text=True,
                            stdin=subprocess.DEVNULL, timeout=120)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    # The tool's summary, as the deploy's preflight prints it: each tray's line (and the
    # router's, whose data --data changes too, or whose backends it makes unusable).
    summary = [line.split(": ", 1) for line in
               result.stderr.split(REFUSED + "\n", 1)[1].splitlines()]
    for tray in TRAYS:
        assert any(line.startswith(says) for host, line in summary if host == tray), summary
    assert {host for host, _ in summary} <= {*TRAYS, ROUTER}


# ---- the inventories: one entry per machine ------------------------------------------------------

def test_a_repeated_name_or_address_is_one_line_naming_both_entries():
    from tasks.inventory_check import duplicate_problems
    tray = {"ssh_hostname": "198.51.100.11", "ssh_user": "root"}
    assert duplicate_problems({"gb200": [("tray-01", tray), ("tray-01", tray)]}) == [
        "tray-01: found twice, as gb200[0] and gb200[1]; need one entry per host (pyinfra "
        "keeps one host, the later entry's data winning key by key)"]
    assert duplicate_problems({"gb200": [("tray-01", tray)],
                               "k8s_control": [("tray-02", {"ssh_hostname": "198.51.100.11"})]}
                              ) == [
        "tray-02: ssh_hostname: found 198.51.100.11 in k8s_control[0], the address of tray-01 "
        "(gb200[0]) too; need one entry per machine (two would deploy it at once)"]
    # A name without ssh_hostname is its own address.
    assert duplicate_problems({"gb200": [("tray-01", tray), "198.51.100.11"]})
    # One address on two SSH ports is two machines; a bare name in a second group only adds
    # the host to that group, as pyinfra means it.
    assert duplicate_problems({"gb200": [("tray-01", tray),
                                         ("tray-02", {**tray, "ssh_port": 2222})],
                               "rack_a": ["tray-01"]}) == []


def pyinfra_inventory(inventory: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    environ = {key: value for key, value in os.environ.items()
               if key not in ("GB200_FAKE", "GB200_FAKE_RUNTIME")}
    return subprocess.run([str(Path(sys.executable).parent / "pyinfra"), str(inventory),
                           "deploy.py", "--dry"], cwd=REPO, env={**environ, **(env or {})},
                          capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=120)


def test_pyinfra_refuses_the_gb200_inventory_with_a_repeated_tray(tmp_path):
    text = (REPO / "inventories" / "gb200.py").read_text()
    last = '    ("gb200-tray-02", {"ssh_hostname": "198.51.100.12", "ssh_user": "root"}),\n'
    assert last in text
    inventory = tmp_path / "gb200.py"
    inventory.write_text(text.replace(last, last + (
        '    ("gb200-tray-01", {"ssh_hostname": "198.51.100.13", "ssh_user": "root"}),\n'
        '    ("gb200-tray-03", {"ssh_hostname": "198.51.100.12", "ssh_user": "root"}),\n')))
    result = pyinfra_inventory(inventory)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"{inventory}: gb200-tray-01: found twice, as gb200[0] and gb200[2]; " \
           "need one entry per host" in result.stderr
    assert f"{inventory}: gb200-tray-03: ssh_hostname: found 198.51.100.12 in gb200[3], the " \
           "address of gb200-tray-02 (gb200[1]) too" in result.stderr


def test_pyinfra_refuses_a_sandbox_whose_hosts_share_an_address(tmp_path):
    (tmp_path / "dup").mkdir()
    (tmp_path / "dup" / "hosts.json").write_text(json.dumps({
        "ssh_key": "/nonexistent/id", "known_hosts": "/nonexistent/known_hosts",
        "api_key_file": "/nonexistent/api-key",
        "hosts": [{"name": "sbx1", "address": "192.0.2.10", "cpu": 0},
                  {"name": "sbx2", "address": "192.0.2.10", "cpu": 1}]}))
    result = pyinfra_inventory(REPO / "inventories" / "sandbox.py",
                               {"SANDBOX_STATE_DIR": str(tmp_path), "SANDBOX_NAME": "dup"})
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "inventories/sandbox.py: sbx2: ssh_hostname: found 192.0.2.10 in sandbox[1], the " \
           "address of sbx1 (sandbox[0]) too" in result.stderr
