"""Turn a pyinfra inventory into testinfra hosts: `pytest tests/infra --inventory INVENTORY`.

Every check reads what to expect from the host's own data (group_data + inventory, resolved by
tasks.settings), never from constants, so one suite runs unchanged against the sandbox and
against GB200 trays. Hosts are test parameters: `-n 4` checks four hosts at once, and a
failure's test id names its host (`test_service_active[gb200-tray-01]`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import ssl
import subprocess
import sys

import pytest
import testinfra

from tasks.inventory_check import serves
from tasks.settings import Settings, client_address, read_settings
from tests.helpers import REPO, FakeHost


def pytest_addoption(parser):
    parser.addoption("--inventory", default=os.environ.get("INFRA_INVENTORY"),
                     help="pyinfra inventory whose hosts to check (or $INFRA_INVENTORY)")
    parser.addoption("--infra-limit", default=None,
                     help="comma-separated host names to check (default: every host)")
    parser.addoption("--infra-data", action="append", default=[], metavar="KEY=VALUE",
                     help="override host data, as pyinfra's --data (repeatable)")


def _inventory(config) -> dict[str, dict]:
    """The serving hosts to check: {name: data}."""
    return _hosts(config)[0]


def _routers(config) -> dict[str, dict]:
    """The router hosts to check (group `router`): {name: data}."""
    return _hosts(config)[1]


def inventory_hosts(config) -> list[tuple[str, set[str], dict]]:
    """(name, groups, data) of every host of the inventory, --infra-limit or not: a router's
    backends are what the deploy gave it."""
    return _hosts(config)[2]


def _hosts(config):
    cached = getattr(config, "_infra_inventory", None)
    if cached is not None:
        return cached
    path = config.getoption("--inventory")
    if not path:
        raise pytest.UsageError("tests/infra needs --inventory INVENTORY (or $INFRA_INVENTORY)")
    result = subprocess.run([sys.executable, "-m", "tools.inventory", path,
                             *config.getoption("--infra-data")], cwd=REPO,
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise pytest.UsageError(f"cannot load inventory {path}:\n{result.stderr[-2000:]}")
    # tools.inventory adds each host's groups as "_groups": not a data key, so it goes here.
    everyone = [(name, set(data["_groups"]),
                 {key: value for key, value in data.items() if key != "_groups"})
                for name, data in json.loads(result.stdout).items()]
    limit = config.getoption("--infra-limit")
    picked = [(name, groups, data) for name, groups, data in everyone
              if not limit or name in limit.split(",")]
    # The drift check's and Kubernetes' control hosts serve no model: nothing here applies.
    # Routers get their own checks (test_router.py).
    serving = {name: data for name, groups, data in picked if serves(groups)}
    routers = {name: data for name, groups, data in picked if "router" in groups}
    config._infra_inventory = (serving, routers, everyone)
    return config._infra_inventory


def pytest_generate_tests(metafunc):
    if "host_name" in metafunc.fixturenames:
        metafunc.parametrize("host_name", sorted(_inventory(metafunc.config)), scope="session")
    if "router_name" in metafunc.fixturenames:
        routers = sorted(_routers(metafunc.config)) or [pytest.param(
            None, marks=pytest.mark.skip(reason="no host in the inventory's router group"))]
        metafunc.parametrize("router_name", routers, scope="session")


@pytest.fixture(scope="session")
def host_data(request, host_name) -> dict:
    return _inventory(request.config)[host_name]


class Secret:
    """A secret the checks send but never show. pytest prints the arguments of every frame of a
    failed test (and, with -l, its locals) in the terminal and in the JUnit XML that
    drift-check keeps: this object prints as ``Secret(<redacted>)`` there, and only the
    call that sends the value reads it, with ``reveal()``."""

    __slots__ = ("_value",)

    def __init__(self, value: str):
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret(<redacted>)"

    __str__ = __repr__

    def __reduce__(self):
        raise TypeError("a Secret is not pickled: it would leave this process in the clear")


def redacted(settings: Settings) -> Settings:
    """The host's settings with the API key wrapped in a Secret: tests take ``settings`` as an
    argument, and a failure prints it, with every field."""
    if settings.api_key is None:
        return settings
    return dataclasses.replace(settings, api_key=Secret(settings.api_key))


@pytest.fixture(scope="session")
def settings(host_name, host_data) -> Settings:
    return redacted(read_settings(FakeHost(host_name, host_data)))


def ssh_host(name: str, data: dict):
    """A testinfra host over the same SSH settings pyinfra uses (or local for @local)."""
    if name.startswith("@local"):
        return testinfra.get_host("local://")
    address = data.get("ssh_hostname") or name
    user = data.get("ssh_user") or "root"
    # A host that does not answer fails its checks in 10 s instead of the TCP timeout.
    extra = ["-o BatchMode=yes", "-o ConnectTimeout=10"]
    if data.get("ssh_known_hosts_file"):
        extra.append(f"-o UserKnownHostsFile={data['ssh_known_hosts_file']}")
    if data.get("ssh_strict_host_key_checking"):
        extra.append(f"-o StrictHostKeyChecking={data['ssh_strict_host_key_checking']}")
    if data.get("ssh_port"):
        extra.append(f"-p {data['ssh_port']}")
    # One master connection per host, reused by every check (a handshake costs ~0.3 s).
    return testinfra.get_host(f"ssh://{user}@{address}", ssh_identity_file=data.get("ssh_key"),
                              ssh_extra_args=" ".join(extra), sudo=user != "root",
                              controlpath=f"/tmp/infra-ssh-{user}@{address}", controlpersist=30)


@pytest.fixture(scope="session")
def host(host_name, host_data):
    return ssh_host(host_name, host_data)


class Endpoint(str):
    """A base URL, with what the controller trusts for it: vllm_tls_ca_file's CA over TLS
    (the preflight checked that the certificate names the host's address), else nothing."""

    context: ssl.SSLContext | None = None


@pytest.fixture(scope="session")
def endpoint(host_name, host_data, settings) -> str:
    """The server's base URL as the controller reaches it: the host's port, or on Kubernetes
    nodes the Service's NodePort (kube-proxy answers it on every node)."""
    port = settings.port
    if settings.runtime == "kubernetes":
        if host_data.get("k8s_service_type") != "NodePort":
            pytest.skip("k8s_service_type ClusterIP: the Service is not reachable from "
                        "outside the cluster")
        port = host_data["k8s_node_port"]
    if settings.tls is None:
        return Endpoint(f"http://{client_address(host_name, host_data)}:{port}")
    url = Endpoint(f"https://{settings.tls_name}:{port}")
    url.context = ssl.create_default_context(cadata=settings.tls.ca)
    return url


@pytest.fixture(scope="session")
def unit_host(host, settings):
    """The host, where vllm.service runs vLLM (every runtime but kubernetes)."""
    if settings.runtime == "kubernetes":
        pytest.skip("vllm_runtime kubernetes: the Deployment runs vLLM, not vllm.service")
    return host


@pytest.fixture(autouse=True)
def _record_host(request, record_property):
    """Name the host in the JUnit XML, so drift-check attributes each failure."""
    for name in ("host_name", "router_name"):
        if name in request.fixturenames:
            record_property("host", request.getfixturevalue(name))
