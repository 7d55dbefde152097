"""vllm.service is up, starts at boot, and listens where the data says, and only there."""

from tasks.settings import UNIT_NAME


def test_service_is_active_and_enabled(host):
    service = host.service(UNIT_NAME.removesuffix(".service"))
    assert service.is_running, f"{UNIT_NAME} is not active"
    assert service.is_enabled, f"{UNIT_NAME} is not enabled"


def test_port_listens_on_the_intended_address_only(host, settings):
    listening = [socket for socket in host.socket.get_listening_sockets()
                 if socket.startswith("tcp://") and socket.endswith(f":{settings.port}")]
    assert listening == [f"tcp://{settings.listen_host}:{settings.port}"]
