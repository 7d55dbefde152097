"""tasks/facts.py: every case in tests/fixtures/facts/<Fact>/<case>.json, then the facts for real.

A case holds the fact's arguments, the command it must send, what the host printed (inline, or
a capture file under tests/fixtures) and the value the fact must make of it, as pyinfra's own
fact tests do.
"""

from __future__ import annotations

import json
import platform
from pathlib import Path

import pytest
from pyinfra.api import Config, Inventory, State, StringCommand
from pyinfra.api.connect import connect_all

from tasks import facts

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
CASES = sorted((FIXTURES / "facts").glob("*/*.json"))


def command_string(command: str | StringCommand) -> str:
    return command.get_raw_value() if isinstance(command, StringCommand) else command


def case_output(case: dict) -> list[str]:
    if "output_file" in case:
        return (FIXTURES / case["output_file"]).read_text().splitlines()
    return case["output"]


def test_every_fact_has_cases():
    covered = {path.parent.name for path in CASES}
    defined = {name for name, value in vars(facts).items()
               if isinstance(value, type) and issubclass(value, facts.FactBase)
               and value.__module__ == facts.__name__}
    # PreflightState asks other facts' questions in one command: their cases, each in its
    # section, and real runs beside the separate facts (tests/unit/test_preflight_state.py).
    assert defined - {"TreeDigests", "PreflightState"} <= covered, defined - covered


@pytest.mark.parametrize("path", CASES, ids=lambda path: f"{path.parent.name}/{path.stem}")
def test_case(path: Path):
    case = json.loads(path.read_text())
    fact = getattr(facts, path.parent.name)()
    assert command_string(fact.command(**case["arg"])) == case["command"]
    assert fact.process(case_output(case)) == case["fact"]


@pytest.mark.parametrize("fact", [facts.NvidiaGpus, facts.NvidiaPciGpus, facts.NvidiaSmiInfo, facts.FreeBytes,
                                  facts.ListeningTcpPorts, facts.SystemdDropIns,
                                  facts.WeightsTree, facts.NvidiaKernelModuleVersion,
                                  facts.CdiSpecDriverVersion, facts.PreflightState])
def test_empty_output_is_the_default(fact):
    # pyinfra skips process() on empty stdout and hands out default(): both must agree.
    assert fact().process([]) == fact.default()


def test_find_mtimes_are_read_exactly():
    # A float would read 1764413012.1234567890 as ...123456768: a verified file would then
    # look changed, and the next deploy would fetch it again.
    assert facts.mtime_ns("1764413012.1234567890") == 1764413012123456789
    assert facts.mtime_ns("1764413012") == 1764413012 * 10**9


@pytest.fixture(scope="module")
def local_host():
    inventory = Inventory((["@local"], {}))
    state = State(inventory, Config())
    connect_all(state)
    host = inventory.get_host("@local")
    assert host.connected
    return host


def test_facts_on_this_machine(local_host):
    # This controller has no GPU and no nvidia-smi: a GPU-less host must read as empty, not fail.
    assert local_host.get_fact(facts.NvidiaGpus) == []
    # A VM with an Intel bridge and virtio devices: no NVIDIA display-class device.
    assert local_host.get_fact(facts.NvidiaPciGpus) == []
    assert local_host.get_fact(facts.NvidiaSmiInfo) == {}
    assert local_host.get_fact(facts.CpuArchitecture) == platform.machine()

    free = local_host.get_fact(facts.FreeBytes, path="/nonexistent/dir")
    assert free["path"] == "/"
    assert free["mount"] == "/"
    assert 0 < free["free_bytes"] <= free["total_bytes"]

    ports = local_host.get_fact(facts.ListeningTcpPorts)
    assert isinstance(ports, list)
    assert all(isinstance(socket["port"], int) for socket in ports)
    assert local_host.state.failed_hosts == set()
