"""What the e2e modules share: the sandbox's name, and calls to pyinfra, the sandbox tool, the
hosts and the endpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

from tests.helpers import REPO

SANDBOX = "e2e"
HOSTS = 2
PYINFRA = str(Path(os.environ.get("VIRTUAL_ENV", REPO / ".venv")) / "bin" / "pyinfra")
ENV = {**os.environ, "SANDBOX_NAME": SANDBOX, "PYTHONUNBUFFERED": "1"}


def sandbox_tool(*args: str, name: str = SANDBOX) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "harness.sandbox", "--name", name, *args],
                          cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)


def pyinfra(*args: str, env: dict | None = None) -> tuple[subprocess.CompletedProcess, dict]:
    result = subprocess.run([PYINFRA, *args, "--json", "inventories/sandbox.py", "deploy.py"],
                            cwd=REPO, env=env or ENV, capture_output=True, text=True,
                            timeout=1500)
    assert result.returncode == 0, f"pyinfra failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result, json.loads(result.stdout)


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


def files_snapshot(host) -> str:
    """A digest of every managed file's path, size and mtime: any write changes it."""
    return host.check_output("find /etc /opt/vllm /raid -xdev -type f -printf '%p %s %T@\\n' "
                             "| sort | sha256sum")
