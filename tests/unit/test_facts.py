"""tasks/facts.py: every case in tests/fixtures/facts/<Fact>/<case>.json, then the facts for real.

A case holds the fact's arguments, the command it must send, what the host printed (inline, or
a capture file under tests/fixtures) and the value the fact must make of it, as pyinfra's own
fact tests do.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
from pathlib import Path

import pytest
from pyinfra.api import Config, Inventory, State, StringCommand
from pyinfra.api.connect import connect_all
from pyinfra.facts.deb import DebPackages

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
                                  facts.CdiSpecDriverVersion, facts.PreflightState,
                                  facts.DebPackagesInstalled])
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


def sh(command: str, path: str) -> list[str]:
    result = subprocess.run(["/bin/sh", "-c", command], capture_output=True, text=True,
                            env={**os.environ, "PATH": path}, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def test_the_python_version_is_the_link_name_s_or_python_s_own(tmp_path):
    fact = facts.PythonVersion()
    tools = tmp_path / "tools"  # the command's one program besides python3
    tools.mkdir()
    (tools / "readlink").symlink_to(shutil.which("readlink"))
    # Debian's and Ubuntu's python3: a link to python3.N, read without starting it (this
    # one would say otherwise if it ran).
    linked = tmp_path / "linked"
    linked.mkdir()
    (linked / "python3.13").write_text("#!/bin/sh\necho 9.9\n")
    (linked / "python3.13").chmod(0o755)
    (linked / "python3").symlink_to("python3.13")
    assert fact.process(sh(fact.command(), f"{linked}:{tools}")) == "3.13"
    # Any other python3 (a venv's, a wrapper script) is asked.
    other = tmp_path / "other"
    other.mkdir()
    (other / "python3").write_text("#!/bin/sh\necho 3.7\n")
    (other / "python3").chmod(0o755)
    assert fact.process(sh(fact.command(), f"{other}:{tools}")) == "3.7"
    assert sh(fact.command(), str(tools)) == []  # none: the default, None
    # And on this machine, what python3 itself says.
    assert fact.process(sh(fact.command(), os.environ["PATH"])) == subprocess.run(
        ["python3", "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
        capture_output=True, text=True, check=True).stdout.strip()


def test_the_installed_packages_asked_by_name_are_pyinfra_s_deb_packages(local_host):
    names = ["dpkg", "curl", "no-such-package-here"]
    installed = local_host.get_fact(facts.DebPackagesInstalled, packages=names)
    every = local_host.get_fact(DebPackages)
    assert set(installed) == {name for name in names if name in every} == {"dpkg", "curl"}
    assert all(version in every[name] for name, version in installed.items())
    assert local_host.get_fact(facts.DebPackagesInstalled, packages=["no-such-package-here"]) \
        == {}
    assert local_host.state.failed_hosts == set()
