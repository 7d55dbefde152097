"""The whole GB200 plan, both runtimes, against @fake hosts that answer as the seed's tray.

tools/gb200-dry-run runs `pyinfra inventories/gb200.py deploy.py --dry` in its own process
(pyinfra's CLI patches gevent: never loaded here) with GB200_FAKE=seed, the Hub served by
tools/hub-mirror on 127.0.0.1 (a Kimi-K2.6-shaped repo of sparse files), and reads back both
pyinfra's JSON plan (`hosts_with_change` per operation) and every planned command.
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
K8S = "@fake/k8s-control-01"
IMAGE = "vllm/vllm-openai:v0.19.1-cu130"
PREFLIGHT = "Preflight | Check data, GPUs, disk and port"
HUB_CHECK = "Model weights | Check Hub revision and free space for the weights"
FETCH = "Model weights | Fetch model moonshotai/Kimi-K2.6@main into /raid/models/kimi-k2.6"
MANIFEST_DIR = "/etc/vllm-kubernetes"


def dry_run(runtime: str, tmp_path: Path) -> dict:
    commands_file = tmp_path / f"commands-{runtime}.json"
    env = {key: value for key, value in os.environ.items()
           if key not in ("HF_TOKEN", "GB200_FAKE", "GB200_FAKE_RUNTIME")}
    result = subprocess.run(
        [sys.executable, str(REPO / "tools" / "gb200-dry-run"), "--runtime", runtime, "--json",
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

def load_inventory(monkeypatch, **env) -> dict:
    for key in ("GB200_FAKE", "GB200_FAKE_RUNTIME"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    values = runpy.run_path(str(REPO / "inventories" / "gb200.py"))
    return {key: value for key, value in values.items()
            if not key.startswith("_") and isinstance(value, (list, tuple))}


def test_production_inventory_declares_real_hosts_and_no_k8s_control_for_docker(monkeypatch):
    groups = load_inventory(monkeypatch)
    assert sorted(groups) == ["drift_control", "gb200", "k8s_control"]
    assert [name for name, _ in groups["gb200"]] == ["gb200-tray-01", "gb200-tray-02"]
    assert all(data["ssh_hostname"].startswith("198.51.100.") for _, data in groups["gb200"])
    # The GB200 default runtime is docker: a control host would refuse docker trays.
    assert groups["k8s_control"] == []


def test_fake_inventory_answers_the_seed_tray_facts(monkeypatch):
    groups = load_inventory(monkeypatch, GB200_FAKE="seed", GB200_FAKE_RUNTIME="kubernetes")
    assert [name for name, _ in groups["gb200"]] == TRAYS
    assert [name for name, _ in groups["k8s_control"]] == [K8S]
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
        assert ops[-1] == FETCH
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
