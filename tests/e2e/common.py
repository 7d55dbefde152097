"""What the e2e modules share: the sandbox's name, and calls to pyinfra, the sandbox tool, the
hosts and the endpoint."""

from __future__ import annotations

import json
import os
import select
import signal
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pytest

from tests.helpers import REPO

SANDBOX = "e2e"
# Three trays and a router in front of them (e2er1): the fleet the roll-out is proved on.
HOSTS = 3
ROUTERS = 1
ROUTER_PORT = 30000
PYINFRA = str(Path(os.environ.get("VIRTUAL_ENV", REPO / ".venv")) / "bin" / "pyinfra")
ENV = {**os.environ, "SANDBOX_NAME": SANDBOX, "PYTHONUNBUFFERED": "1"}


def sandbox_tool(*args: str, name: str = SANDBOX, input: str | None = None
                 ) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "harness.sandbox", "--name", name, *args],
                          cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600,
                          input=input)


def drift_check(out: Path) -> tuple[int, str, dict]:
    """drift-check over the sandbox inventory, its report in `out`: exit code, output, report."""
    result = subprocess.run([sys.executable, "-m", "tools.drift_check",
                             "inventories/sandbox.py", "--out", str(out)],
                            cwd=REPO, env=ENV, capture_output=True, text=True, timeout=900,
                            stdin=subprocess.DEVNULL)
    return (result.returncode, result.stdout + result.stderr,
            json.loads((out / "report.json").read_text()))


def passed_cases(junit: Path) -> set[str]:
    """The test ids a JUnit report lists as passed (not failed, errored or skipped)."""
    return {case.get("name") for case in ElementTree.parse(junit).iter("testcase")
            if not {child.tag for child in case} & {"failure", "error", "skipped"}}


def pyinfra(*args: str, env: dict | None = None) -> tuple[subprocess.CompletedProcess, dict]:
    result = subprocess.run([PYINFRA, *args, "--json", "inventories/sandbox.py", "deploy.py"],
                            cwd=REPO, env=env or ENV, capture_output=True, text=True,
                            timeout=1500)
    assert result.returncode == 0, f"pyinfra failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result, json.loads(result.stdout)


def commands_run(debug_output: str, host_name: str) -> list[str]:
    """The commands a pyinfra run with --debug ran on ``host_name`` (its log lines, cut to
    300 characters): facts and operations alike."""
    return [line[:300] for line in debug_output.splitlines()
            if f"Running command on {host_name}:" in line]


def api_key(sandbox) -> str:
    return Path(sandbox["api_key_file"]).read_text().strip()


def call(address: str, path: str, key: str | None, body: dict | None = None, port: int = 8000,
         context: ssl.SSLContext | None = None):
    """(status, JSON) of one request; over https when `context` says what to trust."""
    scheme = "http" if context is None else "https"
    request = urllib.request.Request(
        f"{scheme}://{address}:{port}{path}", method="POST" if body else "GET",
        data=json.dumps(body).encode() if body else None,
        headers={"Content-Type": "application/json"})
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    with urllib.request.urlopen(request, timeout=120, context=context) as response:
        return response.status, json.load(response)


def service_start(host) -> tuple[str, str]:
    """(start timestamp, main PID) of vllm.service: both change on any restart."""
    out = host.check_output("systemctl show -p ActiveEnterTimestampMonotonic -p MainPID vllm")
    values = dict(line.split("=", 1) for line in out.splitlines())
    return values["ActiveEnterTimestampMonotonic"], values["MainPID"]


def exec_start(host) -> str:
    """vllm.service's command line as systemd holds it (less its run-time status)."""
    shown = host.check_output("systemctl show -p ExecStart --value vllm")
    return shown.split("argv[]=", 1)[1].split(" ;", 1)[0]


def files_snapshot(host) -> str:
    """A digest of every managed file's path, size and mtime: any write changes it (a router
    host has no /opt/vllm nor /raid)."""
    folders = "/etc /opt/vllm /opt/vllm-router /raid /var/lib/vllm-release"
    return host.check_output(f"find {folders} -xdev -type f -printf '%p %s %T@\\n' "
                             "2>/dev/null | sort | sha256sum")


def chat(address: str, key: str | None, port: int = 8000, max_tokens: int = 8):
    return call(address, "/v1/chat/completions", key, {
        "model": "Kimi-K2.6", "max_tokens": max_tokens,
        "messages": [{"role": "user", "content": "你好，请介绍一下你自己"}]}, port=port)


class Stream:
    """A steady stream of chat requests to one endpoint (`workers` clients, each sending its
    next request `pause_s` after the previous answer), counting answers and failures until
    stopped: what clients see while the fleet changes under them. Light on purpose: the
    sandbox's trays share two cores, and a saturating stream starves a tray's restart (it
    once took a canary past its health timeout)."""

    def __init__(self, address: str, key: str, port: int, workers: int = 1,
                 pause_s: float = 1.0):
        self.address, self.key, self.port, self.pause_s = address, key, port, pause_s
        self.answered, self.failures = 0, []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(index,), daemon=True)
                         for index in range(workers)]

    def _run(self, index: int) -> None:
        count = 0
        while not self._stop.is_set():
            count += 1
            try:
                # A prompt of its own each time: the prefix-aware router spreads them.
                status, body = call(self.address, "/v1/chat/completions", self.key, {
                    "model": "Kimi-K2.6", "max_tokens": 8,
                    "messages": [{"role": "user", "content": f"request {index}-{count}"}]},
                    port=self.port)
                ok = status == 200 and body["usage"]["completion_tokens"] > 0
                error = None if ok else f"HTTP {status}"
            except urllib.error.HTTPError as failure:  # the router's or vLLM's own words
                ok, error = False, f"HTTP {failure.code}: {failure.read()[:300]!r}"
            except Exception as failure:  # noqa: BLE001 (every failure is counted)
                ok, error = False, f"{type(failure).__name__}: {failure}"
            if error:
                error = f"{time.strftime('%H:%M:%S')} {error}"  # to read beside the logs
            with self._lock:
                if ok:
                    self.answered += 1
                else:
                    self.failures.append(error)
            self._stop.wait(self.pause_s)

    def __enter__(self) -> "Stream":
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=180)


def deploy_killed_when(sandbox: str, host_name: str, until: str, deploy: list[str], env: dict,
                       what: str, poll_s: float = 0.1) -> None:
    """Run ``deploy`` in a process group of its own and SIGKILL the whole group (pyinfra and
    its SSH connections at one instant) once the shell condition ``until`` holds on
    ``host_name``, which a watcher there polls every ``poll_s``. Fails, never hangs, when
    the deploy ends first (``what``: the point it should have reached)."""
    watcher = subprocess.Popen(
        [sys.executable, "-m", "harness.sandbox", "--name", sandbox, "ssh", host_name,
         f"until {until}; do sleep {poll_s}; done; echo reached"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)
    running = subprocess.Popen(deploy, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True,
                               stdin=subprocess.DEVNULL)
    while not select.select([watcher.stdout], [], [], 1)[0]:
        if running.poll() is not None:
            watcher.kill()
            pytest.fail(f"the deploy exited {running.returncode} before {what}")
    assert watcher.stdout.readline().strip() == "reached"
    os.killpg(running.pid, signal.SIGKILL)
    running.wait()
    watcher.wait(timeout=30)
