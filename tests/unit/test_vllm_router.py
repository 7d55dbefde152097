"""The router's settings, command line and unit, derived from data as tasks/vllm_router.py
does (pure functions: no host, no router running), and the sandbox's fleet layout."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness import sandbox
from tasks.data_keys import DEFAULTS, DataError
from tasks.inventory_check import serves
from tasks.vllm_router import backend_url, backends_of, router_argv, settings_from, unit_text

ROUTER = "router-01"


@pytest.fixture
def wheelhouse(tmp_path) -> str:
    folder = tmp_path / "router-wheelhouse"
    folder.mkdir()
    (folder / "requirements.lock").write_text(
        "# vllm-router==0.1.17 python=3.11 arch=x86_64\n"
        f"vllm-router==0.1.17 --hash=sha256:{'0' * 64}  # vllm_router-0.1.17-cp38-abi3.whl\n")
    return str(folder)


def router_data(wheelhouse: str, **extra) -> dict:
    return {**DEFAULTS, "router_wheelhouse_dir": wheelhouse, **extra}


TRAYS = [("tray-01", {**DEFAULTS, "ssh_hostname": "10.0.0.11"}),
         ("@fake/tray-02", {**DEFAULTS, "vllm_port": 8001}),
         ("tray-03", {**DEFAULTS, "vllm_backend_url": "http://192.0.2.3:9000"})]


def test_backends_are_the_serving_hosts_reached_as_the_data_says(wheelhouse):
    settings = settings_from(ROUTER, router_data(wheelhouse), TRAYS)
    # ssh_hostname; else the inventory name without a connector prefix; else the override.
    assert settings.backends == ("http://10.0.0.11:8000", "http://tray-02:8001",
                                 "http://192.0.2.3:9000")
    assert settings.local_url == "http://127.0.0.1:30000"


def test_backends_of_picks_a_group_or_every_serving_host():
    hosts = [("a", {"gb200"}, 1), ("b", {"gb200", "canary"}, 2), ("r", {"router"}, 3),
             ("d", {"drift_control"}, 4), ("k", {"k8s_control"}, 5)]
    assert backends_of(None, hosts) == [("a", 1), ("b", 2)]
    assert backends_of("canary", hosts) == [("b", 2)]
    assert serves({"gb200"}) and not serves({"router"}) and not serves(["k8s_control"])


def test_an_open_bind_needs_the_admin_risk_accepted_in_so_many_words(wheelhouse):
    with pytest.raises(DataError) as refused:
        settings_from(ROUTER, router_data(wheelhouse, router_host="0.0.0.0"), TRAYS)
    assert [str(item) for item in refused.value.problems] == [
        "router-01: router_host: found '0.0.0.0'; need a loopback address, or "
        "router_accept_open_admin = True: the router's admin routes take no key"]
    settings = settings_from(ROUTER, router_data(wheelhouse, router_host="0.0.0.0",
                                                 router_accept_open_admin=True), TRAYS)
    assert settings.local_url == "http://127.0.0.1:30000"


def test_every_backend_problem_is_named_at_once(wheelhouse, tmp_path):
    trays = [("tray-01", {**DEFAULTS, "vllm_runtime": "kubernetes"}),
             ("tray-02", {**DEFAULTS, "vllm_backend_url": "http://tray-01:8000"})]
    data = router_data(str(tmp_path / "none"), router_version="0.2.0")
    with pytest.raises(DataError) as refused:
        settings_from(ROUTER, data, trays)
    lines = [str(item) for item in refused.value.problems]
    assert lines[0].startswith("router-01: router_wheelhouse_dir: found ")
    assert lines[0].endswith("need a folder with requirements.lock: run router-wheelhouse")
    assert lines[1] == ("tray-01: vllm_runtime: found 'kubernetes'; need docker or venv on a "
                        "backend of router router-01 (a pod has no address of the host's)")
    assert lines[2].startswith("router-01: router_backend_group: found None; need backends "
                               "with a URL each")
    with pytest.raises(DataError) as refused:
        settings_from(ROUTER, router_data(wheelhouse, router_version="0.2.0"), [])
    assert [str(item) for item in refused.value.problems] == [
        f"router-01: router_wheelhouse_dir: found '{wheelhouse}'; need holds no vllm-router "
        "0.2.0: run router-wheelhouse --version 0.2.0",
        "router-01: router_backend_group: found None; need a group with serving hosts in "
        "this inventory (it has none)"]


def test_a_misspelled_router_key_is_refused_with_its_right_name(wheelhouse):
    with pytest.raises(DataError) as refused:
        settings_from(ROUTER, router_data(wheelhouse, router_polcy="random"), TRAYS)
    assert str(refused.value.problems[0]) == ("router-01: router_polcy: unknown key; did you "
                                              "mean router_policy?")


def test_the_command_line_and_unit_hold_every_backend_and_no_secret(wheelhouse):
    settings = settings_from(ROUTER, router_data(wheelhouse, router_policy="power_of_two",
                                                 vllm_api_key_file="/root/secret"), TRAYS)
    argv = router_argv(settings)
    assert argv[0] == "/opt/vllm-router/venv/bin/vllm-router"
    urls = argv.index("--worker-urls")
    assert argv[urls + 1:urls + 4] == list(settings.backends)
    assert argv[argv.index("--policy") + 1] == "power_of_two"
    assert argv[argv.index("--health-check-interval-secs") + 1] == "10"
    assert argv[argv.index("--prometheus-host") + 1] == "127.0.0.1"
    assert not any("key" in arg.lower() for arg in argv)
    unit = unit_text(settings)
    assert "ExecStart=/opt/vllm-router/venv/bin/vllm-router --host 127.0.0.1 --port 30000 " in unit
    assert "DynamicUser=yes" in unit and "EnvironmentFile" not in unit
    assert "3 backend(s)" in unit


def test_sandbox_routers_are_named_apart_and_reach_every_peer(tmp_path):
    hosts = sandbox.plan_hosts("e2e", 3, 1, [5, 6, 9, 12], cpus=2)
    assert [(h["name"], h["role"], h["address"], h["cpu"]) for h in hosts] == [
        ("e2e1", "serve", "10.213.5.2", 0), ("e2e2", "serve", "10.213.6.2", 1),
        ("e2e3", "serve", "10.213.9.2", 0), ("e2er1", "router", "10.213.12.2", 1)]
    (tmp_path / "etc/ssh/sshd_config.d").mkdir(parents=True)
    (tmp_path / "key").write_text("private\n")
    (tmp_path / "key.pub").write_text("public\n")
    sandbox.write_host_files(tmp_path, hosts[3], "ssh-ed25519 AAAA controller\n",
                             tmp_path / "key", [5, 6, 9])
    network = (tmp_path / "etc/systemd/network/10-host0.network").read_text()
    assert "Gateway" not in network.split("[Route]")[0]  # no default route: no internet
    assert network.count("[Route]") == 3
    assert "[Route]\nDestination=10.213.9.0/24\nGateway=10.213.12.1\n" in network
    assert backend_url("e2e1", {"ssh_hostname": "10.213.5.2"}) == "http://10.213.5.2:8000"
    assert Path(tmp_path / "etc/hostname").read_text() == "e2er1\n"
