"""The e2e sandbox: three serving hosts and a router host (systemd-nspawn: real systemd, real
sshd, no internet) booted by sandbox once per test session, under the name "e2e" (apart from
the demo's "sbx"). Needs root; CI provides it. Test modules run in name order on the same
hosts: deploy, docker, drift, endpoint bench, Hub weights, infra suite, faults, roll-out,
secrets, TLS, then the teardown check.

`sandbox["hosts"]` and the `hosts` fixture are the serving hosts (trays), `sandbox["routers"]`
and `routers` the router hosts; `fleet` is both.
"""

from __future__ import annotations

import json
import os

import pytest
import testinfra

from tests.e2e.common import HOSTS, ROUTERS, SANDBOX, sandbox_tool
from tests.helpers import REPO


@pytest.fixture(scope="session")
def sandbox():
    if os.geteuid() != 0:
        pytest.fail("the e2e tests boot systemd-nspawn hosts and need root")
    sandbox_tool("down")  # a sandbox left by an interrupted run
    up = sandbox_tool("up", str(HOSTS), "--routers", str(ROUTERS))
    assert up.returncode == 0, up.stdout + up.stderr
    state = json.loads((REPO / ".sandbox" / SANDBOX / "hosts.json").read_text())
    booted = state["hosts"]
    state["hosts"] = [h for h in booted if h.get("role", "serve") == "serve"]
    state["routers"] = [h for h in booted if h.get("role") == "router"]
    yield state
    sandbox_tool("down")


def ssh_hosts(sandbox, booted: list[dict]) -> dict:
    return {h["name"]: testinfra.get_host(
        f"ssh://root@{h['address']}", ssh_identity_file=sandbox["ssh_key"],
        ssh_extra_args=f"-o UserKnownHostsFile={sandbox['known_hosts']} "
                       "-o StrictHostKeyChecking=yes -o BatchMode=yes")
        for h in booted}


@pytest.fixture(scope="session")
def hosts(sandbox):
    return ssh_hosts(sandbox, sandbox["hosts"])


@pytest.fixture(scope="session")
def routers(sandbox):
    return ssh_hosts(sandbox, sandbox["routers"])


@pytest.fixture(scope="session")
def fleet(hosts, routers):
    return {**hosts, **routers}
