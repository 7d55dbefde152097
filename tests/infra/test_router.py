"""vllm-router on the hosts of the `router` group: running, listening where the data says,
every serving host of the inventory in its rotation and healthy, answering a chat completion
with the trays' API key and refusing one without it (the trays check the key it forwards)."""

from __future__ import annotations

import json
import time

import pytest

from tasks.settings import read_settings
from tasks.vllm_router import UNIT_NAME, LOOPBACK, RouterSettings, backends_of, settings_from
from tests.helpers import FakeHost
from tests.infra.conftest import inventory_hosts, redacted, ssh_host
from tests.infra.test_endpoint import chat, request


@pytest.fixture(scope="session")
def router_data(request, router_name) -> dict:
    return next(data for name, _, data in inventory_hosts(request.config) if name == router_name)


@pytest.fixture(scope="session")
def router_settings(request, router_name, router_data) -> RouterSettings:
    backends = backends_of(router_data.get("router_backend_group"),
                           inventory_hosts(request.config))
    return settings_from(router_name, router_data, backends)


@pytest.fixture(scope="session")
def router_host(router_name, router_data):
    return ssh_host(router_name, router_data)


@pytest.fixture(scope="session")
def served(request, router_data):
    """What clients of the router send: the API key and the model of its first backend (the
    router host's own data need not hold any serving key)."""
    (name, data), *_ = backends_of(router_data.get("router_backend_group"),
                                   inventory_hosts(request.config))
    return redacted(read_settings(FakeHost(name, data)))


@pytest.fixture(scope="session")
def router_endpoint(router_settings) -> str:
    if LOOPBACK.match(router_settings.host):
        pytest.skip(f"router_host {router_settings.host}: only clients on the router host "
                    "reach it")
    return f"http://{router_settings.host}:{router_settings.port}"


def test_router_is_active_and_enabled(router_host):
    service = router_host.service(UNIT_NAME.removesuffix(".service"))
    assert service.is_running, f"{UNIT_NAME} is not active"
    assert service.is_enabled, f"{UNIT_NAME} is not enabled"


def test_router_listens_on_the_intended_address_only(router_host, router_settings):
    listening = [socket for socket in router_host.socket.get_listening_sockets()
                 if socket.startswith("tcp://") and socket.endswith(f":{router_settings.port}")]
    assert listening == [f"tcp://{router_settings.host}:{router_settings.port}"]


def test_every_backend_is_in_rotation_and_healthy(router_host, router_settings):
    """The router's own view (/workers, asked on the router host): exactly the inventory's
    serving hosts, each healthy. A tray missing here gets no traffic; one unhealthy is one the
    router stopped sending to. A tray restarted moments ago counts as healthy once the router
    probed it again: the check allows two probe rounds."""
    deadline = time.monotonic() + 2 * router_settings.health_interval_s + 5
    while True:
        answer = router_host.run(f"curl -fsS --max-time 10 {router_settings.local_url}/workers")
        assert answer.rc == 0, f"the router does not answer /workers: {answer.stderr.strip()}"
        workers = {worker["url"]: worker["is_healthy"]
                   for worker in json.loads(answer.stdout)["workers"]}
        unhealthy = sorted(url for url, healthy in workers.items() if not healthy)
        if sorted(workers) == sorted(router_settings.backends) and not unhealthy:
            return
        if time.monotonic() >= deadline:
            break
        time.sleep(1)
    assert sorted(workers) == sorted(router_settings.backends), (
        f"in rotation: {sorted(workers)}; declared: {sorted(router_settings.backends)}")
    assert not unhealthy, f"backends the router finds unhealthy: {unhealthy}"


def test_chat_completion_through_the_router_answers(router_endpoint, served):
    answer = chat(router_endpoint, served.api_key, served)
    assert answer["usage"]["completion_tokens"] > 0
    assert answer["choices"][0]["message"]["role"] == "assistant"


def test_request_through_the_router_without_the_key_is_refused(router_endpoint, served):
    if served.api_key is None:
        pytest.skip("vllm_api_key_file is None: the trays are open by design")
    body = {"model": served.profile.served_name, "max_tokens": 4,
            "messages": [{"role": "user", "content": "Hello"}]}
    status, _ = request(router_endpoint, "/v1/chat/completions", None, body)
    assert status == 401, f"the router passed a request without the API key: HTTP {status}"
