"""The infra suite (tests/infra) run the way an SRE runs it, against the e2e sandbox: every
check passes on every tray and the router in parallel, GPU checks are skipped with their
reason shown, and
the JUnit report names each host."""

import subprocess
import sys
import xml.etree.ElementTree as ElementTree

from tests.e2e.common import ENV, passed_cases
from tests.helpers import REPO


def test_infra_suite_passes_on_every_host_in_parallel(sandbox, tmp_path):
    junit = tmp_path / "infra.xml"
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "tests/infra", "--inventory", "inventories/sandbox.py",
         "-n", "2", "-rs", "-p", "no:cacheprovider", f"--junitxml={junit}"],
        cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:]
    assert ("no NVIDIA GPU on the PCI bus, and profile sandbox-tiny runs without: no GPU to "
            "check") in result.stdout
    names = {case.get("name") for case in ElementTree.parse(junit).iter("testcase")}
    passed = passed_cases(junit)
    for host in sandbox["hosts"]:
        for check in ("test_service_is_active_and_enabled", "test_chat_completion_answers",
                      "test_the_venv_unit_is_hardened_and_leaves_the_gpus_reachable",
                      "test_the_server_cannot_write_its_weights"):
            assert f"{check}[{host['name']}]" in passed
    for router in sandbox["routers"]:
        for check in ("test_every_backend_is_in_rotation_and_healthy",
                      "test_chat_completion_through_the_router_answers",
                      "test_request_through_the_router_without_the_key_is_refused"):
            assert f"{check}[{router['name']}]" in names
