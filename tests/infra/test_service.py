"""vllm.service is up, starts at boot, and listens where the data says, and only there; on
the docker runtime it runs the declared image with the weights read-only."""

import json

import pytest

from tasks.facts import CpuArchitecture, SystemdDropIns
from tasks.settings import UNIT_NAME
from tasks.vllm_container import CONTAINER_NAME
from tests.helpers import run_fact


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


def test_the_container_runs_the_declared_image_on_read_only_weights(unit_host, settings):
    host = unit_host
    if settings.runtime != "docker":
        pytest.skip(f"vllm_runtime {settings.runtime}: no container to check")
    inspected = host.run(f"docker inspect --format '{{{{json .}}}}' {CONTAINER_NAME}")
    assert inspected.rc == 0, f"no container {CONTAINER_NAME}: {inspected.stderr.strip()}"
    container = json.loads(inspected.stdout)
    assert container["State"]["Running"], container["State"]
    assert container["Config"]["Image"] == settings.image_for(run_fact(host, CpuArchitecture))
    mounts = {mount["Destination"]: mount for mount in container["Mounts"]}
    for folder in filter(None, (settings.model_dir, settings.draft_dir)):
        assert mounts[folder]["Source"] == folder and mounts[folder]["RW"] is False, mounts
