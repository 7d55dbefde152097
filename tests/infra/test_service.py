"""vllm.service is up, starts at boot, and listens where the data says, and only there; on
the docker runtime it runs the declared image with the weights read-only."""

import json

import pytest

from tasks.facts import CpuArchitecture
from tasks.settings import UNIT_NAME
from tasks.vllm_container import CONTAINER_NAME
from tests.helpers import run_fact


def test_service_is_active_and_enabled(unit_host):
    service = unit_host.service(UNIT_NAME.removesuffix(".service"))
    assert service.is_running, f"{UNIT_NAME} is not active"
    assert service.is_enabled, f"{UNIT_NAME} is not enabled"


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
