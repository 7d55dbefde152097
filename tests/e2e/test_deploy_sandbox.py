"""End to end on real hosts: tools/sandbox boots two systemd-nspawn hosts (real systemd, real
sshd, no internet), pyinfra deploys the real CPU build of vLLM to them over SSH, and the
controller checks the OpenAI API, the service and idempotence. Needs root (CI provides it).

The tests run in file order and share one sandbox named "e2e", apart from the demo's.
"""

from __future__ import annotations

import json
import os
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import testinfra

from tests.helpers import REPO

SANDBOX = "e2e"
HOSTS = 2
PYINFRA = str(Path(os.environ.get("VIRTUAL_ENV", REPO / ".venv")) / "bin" / "pyinfra")
ENV = {**os.environ, "SANDBOX_NAME": SANDBOX, "PYTHONUNBUFFERED": "1"}


def sandbox_tool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(REPO / "tools" / "sandbox"), "--name", SANDBOX, *args],
                          cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)


def pyinfra(*args: str) -> tuple[subprocess.CompletedProcess, dict]:
    result = subprocess.run([PYINFRA, *args, "--json", "inventories/sandbox.py", "deploy.py"],
                            cwd=REPO, env=ENV, capture_output=True, text=True, timeout=1500)
    assert result.returncode == 0, f"pyinfra failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result, json.loads(result.stdout)


@pytest.fixture(scope="module")
def sandbox():
    if os.geteuid() != 0:
        pytest.fail("the e2e tests boot systemd-nspawn hosts and need root")
    sandbox_tool("down")  # a sandbox left by an interrupted run
    up = sandbox_tool("up", str(HOSTS))
    assert up.returncode == 0, up.stdout + up.stderr
    state = json.loads((REPO / ".sandbox" / SANDBOX / "hosts.json").read_text())
    yield state
    sandbox_tool("down")


@pytest.fixture(scope="module")
def hosts(sandbox):
    return {h["name"]: testinfra.get_host(
        f"ssh://root@{h['address']}", ssh_identity_file=sandbox["ssh_key"],
        ssh_extra_args=f"-o UserKnownHostsFile={sandbox['known_hosts']} "
                       "-o StrictHostKeyChecking=yes -o BatchMode=yes")
        for h in sandbox["hosts"]}


def api_key(sandbox) -> str:
    return Path(sandbox["api_key_file"]).read_text().strip()


def call(address: str, path: str, key: str | None, body: dict | None = None):
    request = urllib.request.Request(
        f"http://{address}:8000{path}", method="POST" if body else "GET",
        data=json.dumps(body).encode() if body else None,
        headers={"Content-Type": "application/json"})
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    with urllib.request.urlopen(request, timeout=120) as response:
        return response.status, json.load(response)


def service_start(host) -> tuple[str, str]:
    """(start timestamp, main PID) of vllm.service: both change on any restart."""
    out = host.check_output("systemctl show -p ActiveEnterTimestampMonotonic -p MainPID vllm")
    values = dict(line.split("=", 1) for line in out.splitlines())
    return values["ActiveEnterTimestampMonotonic"], values["MainPID"]


def changed_operations(results: dict) -> dict[str, list[str]]:
    return {op["name"]: op["success"] for op in results["results"]["operations"] if op["success"]}


def test_first_deploy_converges_every_host(sandbox):
    result, report = pyinfra("-y")
    operations = report["results"]["operations"]
    assert not [op["name"] for op in operations if op["error"]]
    names = {h["name"] for h in sandbox["hosts"]}
    started = next(op for op in operations if op["name"].startswith("vLLM service | Enable"))
    assert set(started["success"]) == names
    waited = next(op for op in operations if op["name"] == "vLLM service | Wait for vLLM /health")
    assert set(waited["success"]) == names
    assert api_key(sandbox) not in result.stdout + result.stderr


def test_models_lists_the_served_name_on_every_host(sandbox):
    for host in sandbox["hosts"]:
        status, body = call(host["address"], "/v1/models", api_key(sandbox))
        assert status == 200
        assert [model["id"] for model in body["data"]] == ["Kimi-K2.6"]


def test_chat_completion_answers_on_every_host(sandbox):
    for host in sandbox["hosts"]:
        status, body = call(host["address"], "/v1/chat/completions", api_key(sandbox), {
            "model": "Kimi-K2.6", "max_tokens": 8,
            "messages": [{"role": "user", "content": "你好，请介绍一下你自己"}]})
        assert status == 200
        message = body["choices"][0]["message"]
        assert body["usage"]["completion_tokens"] > 0
        # Thinking is on by default: the kimi_k2 parser routes the output to `reasoning`.
        assert message["reasoning"]


def test_request_without_the_api_key_is_refused(sandbox):
    with pytest.raises(urllib.error.HTTPError) as error:
        call(sandbox["hosts"][0]["address"], "/v1/models", None)
    assert error.value.code == 401


def test_service_is_active_enabled_and_secrets_are_private(hosts, sandbox):
    key = api_key(sandbox)
    for host in hosts.values():
        assert host.service("vllm").is_running
        assert host.service("vllm").is_enabled
        env_file = host.file("/etc/vllm/vllm.env")
        assert (env_file.user, env_file.group, env_file.mode) == ("root", "root", 0o600)
        assert key not in host.file("/etc/systemd/system/vllm.service").content_string
        assert key not in host.check_output("ps -eo args")
        assert host.socket("tcp://0.0.0.0:8000").is_listening


def test_second_deploy_changes_nothing_and_restarts_nothing(hosts):
    before = {name: service_start(host) for name, host in hosts.items()}
    _, report = pyinfra("-y")
    assert changed_operations(report) == {}
    assert {name: service_start(host) for name, host in hosts.items()} == before


def test_dry_run_plans_no_change(sandbox):
    _, report = pyinfra("--dry")
    assert {op["name"]: op["hosts_with_change"] for op in report["plan"]
            if op["hosts_with_change"]} == {}


def files_snapshot(host) -> str:
    """A digest of every managed file's path, size and mtime: any write changes it."""
    return host.check_output("find /etc /opt/vllm /raid -xdev -type f -printf '%p %s %T@\\n' "
                             "| sort | sha256sum")


def test_refused_deploy_reports_every_host_and_changes_no_file(hosts):
    before = {name: (files_snapshot(host), service_start(host)) for name, host in hosts.items()}
    result = subprocess.run([PYINFRA, "-y", "--data", "model_profile=kimi-k2.6",
                             "inventories/sandbox.py", "deploy.py"],
                            cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    for name in hosts:
        assert (f"{name}: vllm_tensor_parallel_size: found 0 visible GPU(s); need at least 4 "
                "for tensor parallel 4 (model_profile kimi-k2.6)") in output
    assert "Starting operation: System" not in output  # the run stopped at preflight
    assert {name: (files_snapshot(host), service_start(host))
            for name, host in hosts.items()} == before


def test_rotated_api_key_restarts_the_service_once_and_takes_effect(hosts, sandbox):
    before = {name: service_start(host) for name, host in hosts.items()}
    old_key = api_key(sandbox)
    Path(sandbox["api_key_file"]).write_text(old_key[::-1] + "\n")
    result, report = pyinfra("-y")
    names = sorted(hosts)
    assert changed_operations(report) == {
        "vLLM service | Install vLLM secrets file /etc/vllm/vllm.env": names,
        "vLLM service | Enable and start vllm.service, restart if its inputs changed": names,
        "vLLM service | Wait for vLLM /health": names,
    }
    after = {name: service_start(host) for name, host in hosts.items()}
    assert all(after[name] != before[name] for name in names)
    assert old_key[::-1] not in result.stdout + result.stderr
    address = sandbox["hosts"][0]["address"]
    assert call(address, "/v1/models", old_key[::-1])[0] == 200
    with pytest.raises(urllib.error.HTTPError) as error:
        call(address, "/v1/models", old_key)
    assert error.value.code == 401


def test_down_leaves_no_process_mount_or_veth_behind(sandbox):
    pids = [h["pid"] for h in sandbox["hosts"]]
    down = sandbox_tool("down")
    assert down.returncode == 0, down.stdout + down.stderr
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or b"nspawn" not in \
            Path(f"/proc/{pid}/cmdline").read_bytes()
    mounts = Path("/proc/mounts").read_text()
    assert f".sandbox/{SANDBOX}/" not in mounts
    for host in sandbox["hosts"]:
        assert not Path(f"/sys/class/net/ve-{host['name']}").exists()
    assert not (REPO / ".sandbox" / SANDBOX / "hosts.json").exists()
