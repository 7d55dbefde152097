"""The docker runtime end to end, on a sandbox host of its own ("dock"): Docker runs inside the
systemd-nspawn host, the image is the CPU build of vLLM that vllm-image makes from the
wheelhouse (no registry is reachable: the deploy pushes it and `docker load`s it), and
vllm.service runs it from templates/vllm-container.service.j2, as on a GB200 tray but without
GPUs. The controller talks to the container through the port Docker publishes; bench.py runs
its client in a throwaway container of the same image."""

from __future__ import annotations

import io
import json
import os
import platform
import subprocess
import sys
import tarfile
import time
import urllib.error
from datetime import datetime, timezone
from pathlib import Path

import pytest
import testinfra

from tasks.bench import WORKLOADS
from tasks.operations import STAGED
from tasks.vllm_service import RESTART_MARK, UNIT_PATH
from tests.e2e.common import (PYINFRA, api_key, call, commands_run, deploy_killed_when,
                              passed_cases, pyinfra, sandbox_tool, service_start)
from tests.helpers import REPO, group_data

NAME = "dock"
ENV = {**os.environ, "SANDBOX_NAME": NAME, "SANDBOX_RUNTIME": "docker", "PYTHONUNBUFFERED": "1"}
IMAGE = "vllm-sandbox:0.32.0-cpu"
# The same image under another tag (retagged below): a new release to switch to.
NEW_TAG = "vllm-sandbox:0.32.0-cpu-retagged"
LOADED = f"vLLM container image | Image {IMAGE} present (loaded from vllm_image_tarball)"


@pytest.fixture(scope="module")
def dock():
    if os.geteuid() != 0:
        pytest.fail("the e2e tests boot systemd-nspawn hosts and need root")
    image = subprocess.run([sys.executable, "-m", "harness.vllm_image"], cwd=REPO,
                           capture_output=True, text=True, timeout=1800)
    assert image.returncode == 0, image.stderr[-3000:]
    sandbox_tool("down", name=NAME)
    up = sandbox_tool("up", "1", name=NAME)
    assert up.returncode == 0, up.stdout + up.stderr
    state = json.loads((REPO / ".sandbox" / NAME / "hosts.json").read_text())
    yield state
    sandbox_tool("down", name=NAME)


@pytest.fixture(scope="module")
def host(dock):
    return testinfra.get_host(
        f"ssh://root@{dock['hosts'][0]['address']}", ssh_identity_file=dock["ssh_key"],
        ssh_extra_args=f"-o UserKnownHostsFile={dock['known_hosts']} "
                       "-o StrictHostKeyChecking=yes -o BatchMode=yes")


def container_id(host) -> str:
    return host.check_output("docker ps --quiet --no-trunc --filter name=^vllm$")


def chat(dock) -> dict:
    status, body = call(dock["hosts"][0]["address"], "/v1/chat/completions", api_key(dock), {
        "model": "Kimi-K2.6", "max_tokens": 8,
        "messages": [{"role": "user", "content": "Summarize Kimi-K2.6 in one sentence."}]})
    assert status == 200
    return body


def test_first_deploy_loads_the_image_and_the_container_answers(dock, host):
    result, report = pyinfra("-y", env=ENV)
    operations = {op["name"]: op for op in report["results"]["operations"]}
    assert not [name for name, op in operations.items() if op["error"]]
    assert operations[LOADED]["success"] == ["dock1"]
    assert operations["vLLM service | Wait for vLLM /health"]["success"] == ["dock1"]
    assert api_key(dock) not in result.stdout + result.stderr
    assert chat(dock)["usage"]["completion_tokens"] > 0
    # The unit runs the container, and the image came from the pushed archive, not a registry.
    assert container_id(host)
    assert host.check_output("docker inspect --format '{{.Config.Image}}' vllm") == IMAGE
    exec_start = host.check_output("systemctl show -p ExecStart --value vllm")
    assert "/usr/bin/docker run --rm --name vllm --pull never" in exec_start
    assert api_key(dock) not in exec_start
    assert not host.file("/var/lib/vllm-images").listdir()  # the archive is gone once loaded


def test_a_killed_container_is_started_again_by_systemd(dock, host):
    before = container_id(host)
    host.check_output("docker kill vllm")
    deadline = time.monotonic() + 300
    while True:
        now = container_id(host)
        try:
            if now and now != before and chat(dock):
                break
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        assert time.monotonic() < deadline, host.check_output("journalctl -u vllm -n 30 -o cat")
        time.sleep(2)
    assert int(host.check_output("systemctl show -p NRestarts --value vllm")) >= 1


def test_a_second_deploy_changes_nothing_and_restarts_nothing(dock, host):
    before = (service_start(host), container_id(host))
    result, report = pyinfra("-y", "--debug", env=ENV)
    assert {op["name"]: op["success"] for op in report["results"]["operations"]
            if op["success"]} == {}
    assert (service_start(host), container_id(host)) == before
    # Four commands: the preflight's facts with the system and weights steps', the image (its
    # name depends on the CPU), the Docker host step's and vllm.service's
    # (tasks/facts_together.py); anything more is a fact asked alone.
    asked = commands_run(result.stderr, dock["hosts"][0]["name"])
    assert len(asked) == 4, "\n".join(asked)


def test_the_infra_suite_passes_on_the_container_host(dock, tmp_path):
    junit = tmp_path / "infra.xml"
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "tests/infra", "--inventory", "inventories/sandbox.py",
         "-rs", "-p", "no:cacheprovider", f"--junitxml={junit}"],
        cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:]
    passed = passed_cases(junit)
    assert "test_the_container_runs_the_declared_image_on_read_only_weights[dock1]" in passed
    assert "test_chat_completion_answers[dock1]" in passed


def test_bench_runs_the_client_in_the_pinned_image_with_no_failed_request(dock, host):
    """bench.py on the docker runtime: no venv on the host, so the client is the serving
    image's own vLLM in a throwaway container; the key reaches it by name, never in an argv."""
    workload = WORKLOADS["sandbox"]
    run_id = f"e2e-dock-{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}"
    process = subprocess.Popen(
        [PYINFRA, "-y", "inventories/sandbox.py", "bench.py", "--data", "bench_profile=sandbox",
         "--data", f"bench_run_id={run_id}"],
        cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    listings = []  # what every process on the host showed as its arguments meanwhile
    deadline = time.monotonic() + workload.timeout_s + 300
    while process.poll() is None and time.monotonic() < deadline:
        listings.append(host.check_output("ps -ww -eo args"))
        time.sleep(1)
    if process.poll() is None:
        process.kill()
    output = process.communicate()[0]
    assert process.returncode == 0, output[-5000:]
    folder = REPO / "results" / "bench" / run_id
    result = json.loads((folder / "dock1.json").read_text())
    assert (result["completed"], result["failed"]) == (workload.num_prompts, 0)
    assert result["total_output_tokens"] == workload.num_prompts * workload.output_len
    assert result["output_throughput"] > 0 and result["mean_ttft_ms"] > 0
    assert (result["runtime"], result["vllm_image"]) == ("docker", IMAGE)
    assert result["vllm_version"].startswith("0.32.0")
    assert any("/usr/bin/docker run --rm --name vllm-bench" in listing and
               "vllm bench serve" in listing for listing in listings)
    assert not host.file("/opt/vllm/venv").exists  # no venv on the host could have run it
    key = api_key(dock)
    assert key not in output
    assert not [listing for listing in listings if key in listing]
    for path in folder.iterdir():
        assert key not in path.read_text(errors="replace"), path.name
    # --rm: the client's container is gone; the serving one still serves.
    assert host.check_output("docker ps --all --quiet --filter name=^vllm-bench$") == ""
    assert container_id(host)


def retagged(archive: Path, tag: str, out: Path) -> Path:
    """A copy of the `docker save` archive `archive` whose manifest names `tag`: the same image
    (its ID is its config's digest), so the deploy pushes, loads and restarts on it."""
    with tarfile.open(archive) as source, tarfile.open(out, "w") as copy:
        for member in source:
            data = source.extractfile(member) if member.isfile() else None
            if member.name == "manifest.json":
                manifest = json.load(data)
                manifest[0]["RepoTags"] = [tag]
                text = json.dumps(manifest).encode()
                member.size, data = len(text), io.BytesIO(text)
            copy.addfile(member, data)
    return out


def test_a_deploy_killed_mid_image_push_keeps_serving_and_the_next_one_finishes(
        dock, host, tmp_path):
    """Fault 3, mid-switch of the image: a new tag's archive half pushed when the deploy's
    whole process group is SIGKILLed (a watcher on the host says when). The container keeps
    serving the old image, unrestarted; the next run removes the half-pushed archive, pushes
    and loads the whole one, restarts once on the new tag and leaves nothing staged; back to
    the inventory's data, the old tag serves again."""
    source = REPO / group_data("sandbox")["vllm_image_tarball"]
    archive = retagged(source, NEW_TAG, tmp_path / "retagged.tar")
    staged = f"/var/lib/vllm-images/{archive.name}{STAGED}"
    data = ["--data", f"vllm_image={json.dumps({platform.machine(): NEW_TAG})}",
            "--data", f"vllm_image_tarball={archive}"]
    before = (service_start(host), container_id(host))
    deploy_killed_when(NAME, "dock1", f"[ $(stat -c %s {staged} 2>/dev/null || echo 0) -gt "
                       "100000000 ]", [PYINFRA, "-y", *data, "inventories/sandbox.py",
                       "deploy.py"], ENV, "it pushed 100 MB")
    half = int(host.check_output(f"stat -c %s {staged}"))
    print(f"\ndeploy killed mid-push on dock1: {half / 1e6:.0f} of "
          f"{archive.stat().st_size / 1e6:.0f} MB staged")
    assert half < archive.stat().st_size
    assert (service_start(host), container_id(host)) == before
    assert chat(dock)["usage"]["completion_tokens"] > 0  # the old image serves
    since = time.monotonic()
    pyinfra("-y", *data, env=ENV)
    print(f"the next run loaded the image and served on it after {time.monotonic() - since:.0f}s")
    assert host.check_output("docker inspect --format '{{.Config.Image}}' vllm") == NEW_TAG
    assert service_start(host) != before[0]
    assert chat(dock)["usage"]["completion_tokens"] > 0
    assert not host.file("/var/lib/vllm-images").listdir()
    pyinfra("-y", env=ENV)
    assert host.check_output("docker inspect --format '{{.Config.Image}}' vllm") == IMAGE
    assert chat(dock)["usage"]["completion_tokens"] > 0


def test_an_image_tag_that_does_not_exist_fails_the_deploy_and_the_old_container_serves(
        dock, host):
    """Fault 4, a release whose image does not exist (no archive, and no registry holds the
    tag: the sandbox reaches none): the pull fails before the unit changes, so the deploy
    exits non-zero naming the host and the tag, and the old container serves on, unrestarted.
    A new tag is put to use by the unit alone, so the run marks no restart due before the
    pull, and the next run, back on the old tag, restarts nothing."""
    missing = "vllm-sandbox:no-such-tag"
    before = (service_start(host), container_id(host))
    failed = subprocess.run(
        [PYINFRA, "-y", "--data", f"vllm_image={json.dumps({platform.machine(): missing})}",
         "--data", "vllm_image_tarball=null", "inventories/sandbox.py", "deploy.py"],
        cwd=REPO, env=ENV, capture_output=True, text=True, timeout=900,
        stdin=subprocess.DEVNULL)
    output = failed.stdout + failed.stderr
    assert failed.returncode != 0, output[-3000:]
    assert "[dock1]" in output and missing in output, output[-3000:]
    assert (service_start(host), container_id(host)) == before
    assert missing not in host.file(UNIT_PATH).content_string
    assert chat(dock)["usage"]["completion_tokens"] > 0  # the old image serves
    assert not host.file(RESTART_MARK).exists
    pyinfra("-y", env=ENV)
    assert (service_start(host), container_id(host)) == before
    assert host.check_output("docker inspect --format '{{.Config.Image}}' vllm") == IMAGE
    assert chat(dock)["usage"]["completion_tokens"] > 0


def test_stopping_the_service_leaves_no_container(host):
    host.check_output("systemctl stop vllm")
    assert container_id(host) == ""
    assert host.check_output("docker ps --all --quiet --filter name=^vllm$") == ""
