"""vllm.service is up, starts at boot, and listens where the data says, and only there; on
the venv runtime it is hardened and cannot write its weights; on the docker runtime it runs the
declared image, without capabilities, with the weights read-only."""

import json
import re

import pytest

from tasks.facts import CpuArchitecture, SystemdDropIns
from tasks.settings import UNIT_NAME
from tasks.vllm_container import CONTAINER_NAME
from tests.helpers import run_fact

# `systemd-analyze security`'s exposure of the venv runtime's vllm.service, 0 (safest) to 10:
# 2.0 on the sandbox's systemd 252 (8.2 before the hardening of templates/vllm.service.j2).
MAX_EXPOSURE = 2.5


def test_service_is_active_and_enabled(unit_host):
    service = unit_host.service(UNIT_NAME.removesuffix(".service"))
    assert service.is_running, f"{UNIT_NAME} is not active"
    assert service.is_enabled, f"{UNIT_NAME} is not enabled"


def test_no_local_drop_in_changes_the_unit(unit_host):
    """The deploy declares the whole unit: a drop-in (`systemctl edit`, `systemctl
    set-property`, a file under /etc/systemd or /run/systemd) changes what runs while the unit
    file looks right. The deploy removes the unit's own; those for every service
    (service.d) are the host's and left to the operator: this check names them all."""
    found = run_fact(unit_host, SystemdDropIns, UNIT_NAME)
    assert not found, f"drop-ins change {UNIT_NAME}: {', '.join(found)}"


def test_port_listens_on_the_intended_address_only(unit_host, settings):
    listening = [socket for socket in unit_host.socket.get_listening_sockets()
                 if socket.startswith("tcp://") and socket.endswith(f":{settings.port}")]
    assert listening == [f"tcp://{settings.listen_host}:{settings.port}"]


def test_the_venv_unit_is_hardened_and_leaves_the_gpus_reachable(unit_host, settings):
    """The hardening holds (a drop-in or an edit that loosens it shows in the score), and none
    of it closes the device list: vLLM must still open /dev/nvidia*."""
    if settings.runtime != "venv":
        pytest.skip(f"vllm_runtime {settings.runtime}: the unit runs the docker client as root; "
                    "the container's own flags are checked below")
    report = unit_host.check_output(f"systemd-analyze security --no-pager {UNIT_NAME}")
    found = re.search(r"exposure level for \S+: (\d+(?:\.\d+)?)", report)
    assert found, f"no exposure level in systemd-analyze's report:\n{report[-1000:]}"
    exposure = float(found.group(1))
    loose = [line for line in report.splitlines() if line.startswith("✗")]
    assert exposure <= MAX_EXPOSURE, (
        f"{UNIT_NAME} exposure {exposure} > {MAX_EXPOSURE}; open:\n" + "\n".join(loose))
    shown = unit_host.check_output(
        f"systemctl show -p DevicePolicy -p DeviceAllow -p PrivateDevices {UNIT_NAME}")
    devices = dict(line.split("=", 1) for line in shown.splitlines())  # empty ones left out
    assert (devices["DevicePolicy"], devices.get("DeviceAllow", ""), devices["PrivateDevices"]) \
        == ("auto", "", "no"), f"{UNIT_NAME} limits the devices vLLM may open: {devices}"


def test_the_server_cannot_write_its_weights(unit_host, settings):
    """The weights folder as the running server sees it (its own mount namespace): read-only.
    On the venv runtime that is ProtectSystem=strict; the container's mount is checked below."""
    if settings.runtime != "venv":
        pytest.skip(f"vllm_runtime {settings.runtime}: see the container's mounts below")
    pid = unit_host.check_output(f"systemctl show -p MainPID --value {UNIT_NAME}")
    assert pid not in ("", "0"), f"{UNIT_NAME} has no main process"
    mounts = unit_host.file(f"/proc/{pid}/mountinfo").content_string.splitlines()
    # mountinfo: ID PARENT MAJ:MIN ROOT MOUNT_POINT OPTIONS ...; the last mount of the longest
    # mount point holding the weights folder is the one the server sees there.
    covering = [(len(fields[4]), index, fields[4], fields[5].split(","))
                for index, fields in enumerate(line.split() for line in mounts)
                if settings.model_dir == fields[4]
                or settings.model_dir.startswith(fields[4].rstrip("/") + "/")]
    assert covering, f"no mount holds {settings.model_dir} for PID {pid}"
    _, _, mount_point, options = max(covering)
    assert "ro" in options, f"{settings.model_dir} is writable by vLLM ({mount_point}: {options})"


def test_the_container_runs_the_declared_image_on_read_only_weights(unit_host, settings):
    host = unit_host
    if settings.runtime != "docker":
        pytest.skip(f"vllm_runtime {settings.runtime}: no container to check")
    inspected = host.run(f"docker inspect --format '{{{{json .}}}}' {CONTAINER_NAME}")
    assert inspected.rc == 0, f"no container {CONTAINER_NAME}: {inspected.stderr.strip()}"
    container = json.loads(inspected.stdout)
    assert container["State"]["Running"], container["State"]
    assert container["Config"]["Image"] == settings.image_for(run_fact(host, CpuArchitecture))
    confined = container["HostConfig"]
    assert (confined["CapDrop"], confined["CapAdd"], confined["Privileged"]) == \
        (["ALL"], None, False), f"the container holds capabilities: {confined['CapDrop']=}"
    assert "no-new-privileges" in (confined["SecurityOpt"] or []), confined["SecurityOpt"]
    mounts = {mount["Destination"]: mount for mount in container["Mounts"]}
    for folder in filter(None, (settings.model_dir, settings.draft_dir)):
        assert mounts[folder]["Source"] == folder and mounts[folder]["RW"] is False, mounts
