"""drift-check against the deployed e2e sandbox: in sync, a hand-edited unit, a stopped
service (no secret in any report), drop-ins, a file left in the weights folder, an
unreachable host, then a normal deploy converges everything again. The check itself never
changes a host: managed files are compared before and after."""

from __future__ import annotations

import stat
import subprocess
import xml.etree.ElementTree as ElementTree

from tests.e2e.common import api_key, drift_check, files_snapshot, pyinfra

DROP_IN = "/etc/systemd/system/vllm.service.d/restart.conf"
STRAY = "/raid/models/tiny-kimi/notes.txt"


def test_in_sync_exits_0_writes_every_report_and_changes_nothing(fleet, tmp_path):
    """Every host of the inventory, the router included."""
    before = {name: files_snapshot(host) for name, host in fleet.items()}
    code, output, report = drift_check(tmp_path)
    assert code == 0, output
    assert {name: host["status"] for name, host in report["hosts"].items()} == \
        {name: "in_sync" for name in fleet}
    metrics = (tmp_path / "drift.prom").read_text()
    for name in fleet:
        assert f'vllm_deploy_drift{{host="{name}"}} 0' in metrics
        assert f'vllm_deploy_check_failures{{host="{name}"}} 0' in metrics
    assert "vllm_deploy_drift_last_run_timestamp_seconds " in metrics
    cases = list(ElementTree.parse(tmp_path / "junit.xml").iter("testcase"))
    checked = {prop.get("value") for case in cases for prop in case.iter("property")
               if prop.get("name") == "host"}
    assert checked == set(fleet)
    assert {name: files_snapshot(host) for name, host in fleet.items()} == before


def test_a_hand_edited_unit_is_drift_naming_the_host_and_the_operation(hosts, tmp_path):
    hosts["e2e1"].run("sed -i 's/^RestartSec=10/RestartSec=3/' /etc/systemd/system/vllm.service")
    code, output, report = drift_check(tmp_path)
    assert code == 1, output
    assert "DRIFT e2e1: planned change: vLLM service | Install vllm.service unit" in output
    assert report["hosts"]["e2e2"]["status"] == "in_sync"
    assert 'vllm_deploy_drift{host="e2e1"} 1' in (tmp_path / "drift.prom").read_text()


def test_a_stopped_service_is_drift_naming_the_service_check(hosts, sandbox, tmp_path):
    hosts["e2e2"].run("systemctl stop vllm.service")
    code, output, report = drift_check(tmp_path)
    assert code == 1, output
    assert "DRIFT e2e2: failed check: test_service_is_active_and_enabled[e2e2]" in output
    assert "DRIFT e2e2: failed check: test_chat_completion_answers[e2e2]: Failed: " in output
    assert report["hosts"]["e2e2"]["failed_checks"]
    # Every endpoint check failed with the key in hand: none of them wrote it anywhere.
    key = api_key(sandbox)
    for name in ("report.json", "junit.xml", "drift.prom"):
        assert key not in (tmp_path / name).read_text(), name
    assert key not in output
    modes = {name: stat.S_IMODE((tmp_path / name).stat().st_mode)
             for name in ("report.json", "junit.xml", "drift.prom")}
    assert modes == {"report.json": 0o600, "junit.xml": 0o600, "drift.prom": 0o644}


def test_drop_ins_are_drift_naming_the_removal_and_the_check(hosts, tmp_path):
    """A drop-in by hand (loaded) on e2e1 and `systemctl set-property` on e2e2: the unit file
    is untouched, what runs is not."""
    hosts["e2e1"].run(f"mkdir -p {DROP_IN.rsplit('/', 1)[0]} && "
                      f"printf '[Service]\\nRestartSec=600\\n' > {DROP_IN} && "
                      "systemctl daemon-reload")
    hosts["e2e2"].run("systemctl set-property vllm.service CPUWeight=50")
    assert hosts["e2e1"].check_output("systemctl show -p RestartUSec --value vllm") == "10min"
    code, output, _ = drift_check(tmp_path)
    assert code == 1, output
    for name in ("e2e1", "e2e2"):
        assert (f"DRIFT {name}: planned change: vLLM service | Remove local drop-ins of "
                "vllm.service") in output
        assert (f"DRIFT {name}: failed check: test_no_local_drop_in_changes_the_unit[{name}]"
                in output)
    assert DROP_IN in output
    assert "/etc/systemd/system.control/vllm.service.d/" in output


def test_a_file_left_in_the_weights_folder_is_drift(hosts, tmp_path):
    hosts["e2e2"].run(f"echo mine > {STRAY}")
    code, output, _ = drift_check(tmp_path)
    assert code == 1, output
    assert ("DRIFT e2e2: planned change: Model weights | Place sandbox-tiny weights in "
            "/raid/models/tiny-kimi") in output
    assert ("DRIFT e2e2: failed check: test_weights_folders_hold_only_declared_files[e2e2]"
            in output) and "notes.txt" in output


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


def test_a_normal_deploy_converges_everything_again(hosts, tmp_path):
    pyinfra("-y")
    code, output, _ = drift_check(tmp_path)
    assert code == 0, output
    # The drop-ins and the stray file are gone, and what runs is the declared unit again.
    assert hosts["e2e1"].check_output("systemctl show -p RestartUSec --value vllm") == "10s"
    assert not hosts["e2e1"].file(DROP_IN).exists
    assert not hosts["e2e2"].file("/etc/systemd/system.control/vllm.service.d").exists
    assert not hosts["e2e2"].file(STRAY).exists
