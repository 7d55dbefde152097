"""End to end on real hosts: pyinfra deploys the real CPU build of vLLM over SSH to the three
trays of tests/e2e/conftest.py and vllm-router to its router host, and the controller checks
the OpenAI API (on each tray and through the router), the service, the kept release,
idempotence, a refused deploy and a secret rotation. Tests run in file order."""

from __future__ import annotations

import subprocess
import urllib.error
from pathlib import Path

import pytest

from tests.e2e.common import (ENV, PYINFRA, ROUTER_PORT, api_key, call, chat, commands_run,
                              files_snapshot, pyinfra, service_start)
from tests.helpers import REPO


KEEP = "vLLM service | Keep the release that now serves as the last good one"
ROUTER_WAIT = "vLLM router | Wait for the router to report every backend healthy"


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
    kept = next(op for op in operations if op["name"] == KEEP)
    assert set(kept["success"]) == names
    routed = next(op for op in operations if op["name"] == ROUTER_WAIT)
    assert set(routed["success"]) == {h["name"] for h in sandbox["routers"]}
    assert api_key(sandbox) not in result.stdout + result.stderr


def test_the_release_that_answered_is_kept_for_root_only(hosts):
    """What a failed restart puts back (tasks/vllm_service.py): the unit and env file that
    served, and the venv the link pointed at."""
    for host in hosts.values():
        release = host.file("/var/lib/vllm-release")
        assert (release.user, release.mode) == ("root", 0o700)
        assert host.file("/var/lib/vllm-release/vllm.service").content == \
            host.file("/etc/systemd/system/vllm.service").content
        kept_env = host.file("/var/lib/vllm-release/vllm.env")
        assert kept_env.mode == 0o600
        assert kept_env.content == host.file("/etc/vllm/vllm.env").content
        assert host.file("/var/lib/vllm-release/venv-link").content_string.strip() == \
            host.file("/opt/vllm/venv").linked_to


def test_chat_through_the_router_answers_and_needs_the_key(sandbox):
    router = sandbox["routers"][0]["address"]
    status, body = chat(router, api_key(sandbox), port=ROUTER_PORT)
    assert status == 200 and body["usage"]["completion_tokens"] > 0
    with pytest.raises(urllib.error.HTTPError) as error:
        chat(router, None, port=ROUTER_PORT)
    assert error.value.code == 401


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
    result, report = pyinfra("-y", "--debug")
    assert changed_operations(report) == {}
    assert {name: service_start(host) for name, host in hosts.items()} == before
    # Three commands a tray: the preflight asks its facts with the system and weights steps'
    # (tasks/facts_together.py), the venv and vllm.service steps each theirs; anything more
    # is a fact asked alone.
    for name in hosts:
        asked = commands_run(result.stderr, name)
        assert len(asked) == 3, "\n".join(asked)


def test_mode_fixes_and_a_stale_token_change_no_content_and_restart_nothing(hosts):
    """A chmod of the env file (both hosts) and of the unit (e2e2), and a Hub token left by
    the Hub path (e2e1, on the push path now): each is put right, and vLLM keeps running."""
    for host in hosts.values():
        host.run("chmod 0644 /etc/vllm/vllm.env")
    hosts["e2e2"].run("chmod 0600 /etc/systemd/system/vllm.service")
    hosts["e2e1"].run("install -D -m 0600 /dev/null /etc/weights-fetch/hf-token && "
                      "echo hf_stale > /etc/weights-fetch/hf-token")
    before = {name: service_start(host) for name, host in hosts.items()}
    _, report = pyinfra("-y")
    assert changed_operations(report) == {
        "Model weights | Remove Hub token /etc/weights-fetch/hf-token": ["e2e1"],
        "vLLM service | Install vLLM secrets file /etc/vllm/vllm.env": sorted(hosts),
        "vLLM service | Install vllm.service unit (venv runtime)": ["e2e2"],
    }
    assert {name: service_start(host) for name, host in hosts.items()} == before
    for host in hosts.values():
        assert host.file("/etc/vllm/vllm.env").mode == 0o600
        assert host.file("/etc/systemd/system/vllm.service").mode == 0o644
    assert not hosts["e2e1"].file("/etc/weights-fetch/hf-token").exists


def test_dry_run_plans_no_change(sandbox):
    _, report = pyinfra("--dry")
    assert {op["name"]: op["hosts_with_change"] for op in report["plan"]
            if op["hosts_with_change"]} == {}


def test_refused_deploy_reports_every_host_and_changes_no_file(hosts):
    before = {name: (files_snapshot(host), service_start(host)) for name, host in hosts.items()}
    # A pinned commit (Kimi-K2.6 runs remote code): the data passes, the hosts' facts refuse.
    result = subprocess.run([PYINFRA, "-y", "--data", "model_profile=kimi-k2.6",
                             "--data", f"model_revision={'0123abcd' * 5}",
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
        "vLLM service | Mark a restart of vllm.service due "
        "(/var/lib/vllm-release.restart-due) before its files change, if this run restarts it":
            names,
        "vLLM service | Install vLLM secrets file /etc/vllm/vllm.env": names,
        "vLLM service | Enable and start vllm.service, restart if its inputs changed": names,
        "vLLM service | Wait for vLLM /health": names,
        KEEP: names,
    }
    after = {name: service_start(host) for name, host in hosts.items()}
    assert all(after[name] != before[name] for name in names)
    assert old_key[::-1] not in result.stdout + result.stderr
    address = sandbox["hosts"][0]["address"]
    assert call(address, "/v1/models", old_key[::-1])[0] == 200
    with pytest.raises(urllib.error.HTTPError) as error:
        call(address, "/v1/models", old_key)
    assert error.value.code == 401
