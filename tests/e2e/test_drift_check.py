"""tools/drift-check against the deployed e2e sandbox: in sync, a hand-edited unit, a stopped
service, an unreachable host, then a normal deploy converges everything again. The check
itself never changes a host: managed files are compared before and after."""

from __future__ import annotations

import json
import subprocess
import sys
import xml.etree.ElementTree as ElementTree


from tests.e2e.common import ENV, files_snapshot, pyinfra
from tests.helpers import REPO


def drift_check(out) -> tuple[int, str, dict]:
    result = subprocess.run([sys.executable, str(REPO / "tools" / "drift-check"),
                             "inventories/sandbox.py", "--out", str(out)],
                            cwd=REPO, env=ENV, capture_output=True, text=True, timeout=900,
                            stdin=subprocess.DEVNULL)
    return (result.returncode, result.stdout + result.stderr,
            json.loads((out / "report.json").read_text()))


def test_in_sync_exits_0_writes_every_report_and_changes_nothing(hosts, tmp_path):
    before = {name: files_snapshot(host) for name, host in hosts.items()}
    code, output, report = drift_check(tmp_path)
    assert code == 0, output
    assert {name: host["status"] for name, host in report["hosts"].items()} == \
        {name: "in_sync" for name in hosts}
    metrics = (tmp_path / "drift.prom").read_text()
    for name in hosts:
        assert f'vllm_deploy_drift{{host="{name}"}} 0' in metrics
        assert f'vllm_deploy_check_failures{{host="{name}"}} 0' in metrics
    assert "vllm_deploy_drift_last_run_timestamp_seconds " in metrics
    cases = list(ElementTree.parse(tmp_path / "junit.xml").iter("testcase"))
    checked = {prop.get("value") for case in cases for prop in case.iter("property")
               if prop.get("name") == "host"}
    assert checked == set(hosts)
    assert {name: files_snapshot(host) for name, host in hosts.items()} == before


def test_a_hand_edited_unit_is_drift_naming_the_host_and_the_operation(hosts, tmp_path):
    hosts["e2e1"].run("sed -i 's/^RestartSec=10/RestartSec=3/' /etc/systemd/system/vllm.service")
    code, output, report = drift_check(tmp_path)
    assert code == 1, output
    assert "DRIFT e2e1: planned change: vLLM service | Install vllm.service unit" in output
    assert report["hosts"]["e2e2"]["status"] == "in_sync"
    assert 'vllm_deploy_drift{host="e2e1"} 1' in (tmp_path / "drift.prom").read_text()


def test_a_stopped_service_is_drift_naming_the_service_check(hosts, tmp_path):
    hosts["e2e2"].run("systemctl stop vllm.service")
    code, output, report = drift_check(tmp_path)
    assert code == 1, output
    assert "DRIFT e2e2: failed check: test_service_is_active_and_enabled[e2e2]" in output
    assert report["hosts"]["e2e2"]["failed_checks"]


def test_an_unreachable_host_cannot_be_checked(sandbox, tmp_path):
    interface = f"ve-{sandbox['hosts'][0]['name']}"
    subprocess.run(["ip", "link", "set", interface, "down"], check=True)
    try:
        code, output, report = drift_check(tmp_path)
    finally:
        subprocess.run(["ip", "link", "set", interface, "up"], check=True)
    assert code == 2, output
    assert "UNCHECKED e2e1:" in output
    assert report["hosts"]["e2e1"]["status"] == "unreachable"
    assert 'vllm_deploy_unreachable{host="e2e1"} 1' in (tmp_path / "drift.prom").read_text()


def test_a_normal_deploy_converges_everything_again(tmp_path):
    pyinfra("-y")
    code, output, _ = drift_check(tmp_path)
    assert code == 0, output
