"""The e2e sandbox: two systemd-nspawn hosts (real systemd, real sshd, no internet) booted by
sandbox once per test session, under the name "e2e" (apart from the demo's "sbx").
Needs root; CI provides it. Test modules run in name order on the same hosts: deploy, drift,
endpoint bench, Hub weights, infra suite, then the teardown check.
"""

from __future__ import annotations

import json
import os

import pytest
import testinfra

from tests.e2e.common import HOSTS, SANDBOX, sandbox_tool
from tests.helpers import REPO


@pytest.fixture(scope="session")
def sandbox():
    if os.geteuid() != 0:
        pytest.fail("the e2e tests boot systemd-nspawn hosts and need root")
    sandbox_tool("down")  # a sandbox left by an interrupted run
    up = sandbox_tool("up", str(HOSTS))
    assert up.returncode == 0, up.stdout + up.stderr
    state = json.loads((REPO / ".sandbox" / SANDBOX / "hosts.json").read_text())
    yield state
    sandbox_tool("down")


@pytest.fixture(scope="session")
def hosts(sandbox):
    return {h["name"]: testinfra.get_host(
        f"ssh://root@{h['address']}", ssh_identity_file=sandbox["ssh_key"],
        ssh_extra_args=f"-o UserKnownHostsFile={sandbox['known_hosts']} "
                       "-o StrictHostKeyChecking=yes -o BatchMode=yes")
        for h in sandbox["hosts"]}
