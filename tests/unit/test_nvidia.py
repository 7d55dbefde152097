"""tasks/nvidia.py: what `prepare` plans on GPU hosts in given states, as data.

pyinfra's ``@fake`` connector stands in for the host because these machines have no GPU, no
driver and no NVIDIA apt repository: every fact command gets the answer a host in the case's
state would print (GPU lines from tests/fixtures/facts/NvidiaGpus: the real H200 capture and
the synthesized GB200 tray), and the test reads the commands each operation would run. A case
holds the host's state, the data that differs from the defaults, and the expected plan:
{operation name: commands}, listing only operations that change something.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import re
import subprocess
from pathlib import Path

import pytest
from pyinfra.api import (Config, FileUploadCommand, FunctionCommand, Inventory, State,
                         StringCommand)
from pyinfra.api.connect import connect_all
from pyinfra.api.deploy import add_deploy
from pyinfra.api.host import Host
from pyinfra.api.operations import run_ops
from pyinfra.context import ctx_host, ctx_state
from pyinfra.facts.deb import DebPackages
from pyinfra.facts.files import Directory, File, Sha1File
from pyinfra.facts.systemd import SystemdEnabled, SystemdStatus

from tasks import nvidia
from tasks.facts import (CdiSpecDriverVersion, DebPackagesInstalled, NvidiaGpus,
                         NvidiaKernelModuleVersion, NvidiaPciGpus)
from tasks.nvidia import CDI_SPEC, DAEMON_JSON, daemon_json, driver_problems
from tasks.data_keys import DEFAULTS, DataError
from tests.helpers import fact_command, group_data, planned_commands

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
HOST = "tray-01"


def gpu_lines(fixture: str) -> list[str]:
    case = FIXTURES / "facts" / "NvidiaGpus" / f"{fixture}.json"
    return json.loads(case.read_text())["output"]


GB200_TRAY = gpu_lines("gb200-4gpu-synthesized")  # driver 580.95.05, persistence on
H200_BOX = gpu_lines("h200-1gpu")  # REAL capture: driver 580.159.04, persistence on


def with_driver(lines: list[str], driver: str) -> list[str]:
    return [re.sub(r", 5\d\d\.\d+\.\d+, ", f", {driver}, ", line) for line in lines]


def persistence_off(lines: list[str], *indexes: int) -> list[str]:
    return [line.removesuffix("Enabled") + "Disabled" if int(line.split(",")[0]) in indexes
            else line for line in lines]


# /proc/driver/nvidia/version: the H200 line is REAL (the borrowed H200 machine, 2026-11-29);
# the aarch64 lines are that line with the GB200's architecture and driver.
MODULE_H200 = ("NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  580.159.04  "
               "Release Build  (nixbld@)  ")
MODULE_580 = ("NVRM version: NVIDIA UNIX Open Kernel Module for aarch64  580.95.05  "
              "Release Build  (dvs-builder@U16-I3-B03-4-3)  Thu Sep 18 22:37:52 UTC 2025")
MODULE_570 = ("NVRM version: NVIDIA UNIX Open Kernel Module for aarch64  570.133.20  "
              "Release Build  (dvs-builder@U16-I3-B03-4-3)  Fri Mar 14 10:03:15 UTC 2025")

# The defaults this task reads, as tasks/data_keys.py declares them.
DATA = {name: DEFAULTS[name] for name in (
    "docker_package", "docker_daemon_settings", "nvidia_container_toolkit_package",
    "nvidia_driver_min_branch", "nvidia_driver_install", "nvidia_driver_package",
    "nvidia_driver_allow_reboot")}
INSTALL_AND_REBOOT = {"nvidia_driver_install": True, "nvidia_driver_allow_reboot": True}

TRAY_PCI = ["0008:01:00.0", "0009:01:00.0", "0018:01:00.0", "0019:01:00.0"]

# A GB200 tray this task has converged (package versions are made up, shaped like Ubuntu's).
CONVERGED = {
    "gpus": GB200_TRAY,
    "module": MODULE_580,
    "packages": {"curl": "8.5.0-2ubuntu10.6", "docker.io": "27.5.1-0ubuntu3~24.04.2",
                 "nvidia-container-toolkit": "1.18.0-1",
                 "nvidia-driver-580-open": "580.95.05-0ubuntu0.24.04.2"},
    "files": {DAEMON_JSON: daemon_json(DATA["docker_daemon_settings"])},
    "cdi_driver": "580.95.05",
    "docker": {"running": True, "enabled": True},
}
BARE = {**CONVERGED, "gpus": persistence_off(GB200_TRAY, 0, 1, 2, 3),
        "packages": {"curl": "8.5.0-2ubuntu10.6",
                     "nvidia-driver-580-open": "580.95.05-0ubuntu0.24.04.2"},
        "files": {}, "cdi_driver": None, "docker": {"running": False, "enabled": False}}
OLD_DRIVER = {**CONVERGED, "gpus": with_driver(GB200_TRAY, "570.133.20"), "module": MODULE_570,
              "cdi_driver": "570.133.20",
              "packages": {name: version for name, version in CONVERGED["packages"].items()
                           if name != "nvidia-driver-580-open"}}
# Someone ran `nvidia-ctk runtime configure --runtime=docker --set-as-default` by hand.
DRIFTED_DAEMON_JSON = json.dumps({**json.loads(CONVERGED["files"][DAEMON_JSON]),
                                  "default-runtime": "nvidia"}, indent=4, sort_keys=True) + "\n"

APT_INSTALL = ('DEBIAN_FRONTEND=noninteractive apt-get -y -o Dpkg::Options::="--force-confdef" '
               '-o Dpkg::Options::="--force-confold" install')
NAMES = {
    "driver check": "Check NVIDIA driver branch",
    "apt update": "Refresh apt package lists",
    "apt check": "Check apt offers the packages not yet installed",
    "packages": "Install Docker and the NVIDIA Container Toolkit",
    "driver": "Install NVIDIA driver nvidia-driver-580-open",
    "reboot": "Reboot into the NVIDIA driver just installed",
    "daemon.json": f"Install Docker daemon settings {DAEMON_JSON}",
    "docker": "Enable and start docker.service, restart it if daemon.json changed",
    "cdi": f"Generate CDI spec {CDI_SPEC} for the loaded driver",
    "persistence": "Turn on persistence mode on every GPU",
}
GENERATE_CDI = ("mkdir -p /etc/cdi /etc/cdi-nvidia.partial && nvidia-ctk cdi generate "
                "--output=/etc/cdi-nvidia.partial/nvidia.yaml && mv -f "
                "/etc/cdi-nvidia.partial/nvidia.yaml /etc/cdi/nvidia.yaml && "
                "rmdir /etc/cdi-nvidia.partial")
REBOOT = ["call remove_any_askpass_file", "call capture_uptime",
          "( sleep 1 && reboot ) </dev/null >/dev/null 2>&1 &", "call wait_and_reconnect",
          "call clean_sudo_info"]


def apt_check(*packages: str):
    """The candidate check, looking up exactly these packages in this order (what its script
    prints is tested by running it, below)."""
    return lambda command: (command.startswith("sh -c ")
                            and re.findall(r"apt-cache policy (\S+)", command) == list(packages))


CASES = [
    {"id": "bare GB200 tray: no Docker, no toolkit, no daemon.json, persistence off",
     "host": BARE, "data": {},
     "plan": {
         NAMES["apt update"]: ["apt-get update"],
         NAMES["apt check"]: [apt_check("docker.io", "nvidia-container-toolkit")],
         NAMES["packages"]: [f"{APT_INSTALL} docker.io nvidia-container-toolkit"],
         NAMES["daemon.json"]: ["mkdir -p /etc/docker", "chown root:root /etc/docker",
                                f"upload {DAEMON_JSON}", f"chown root:root {DAEMON_JSON}",
                                f"chmod 644 {DAEMON_JSON}"],
         # Not running yet, so no restart planned: docker.io's install starts it, and when
         # this runs the fresh fact shows it running and the new daemon.json restarts it.
         NAMES["docker"]: ["systemctl start docker.service", "systemctl enable docker.service"],
         NAMES["cdi"]: [GENERATE_CDI],
         NAMES["persistence"]: ["nvidia-smi -pm 1"],
     }},
    {"id": "converged GB200 tray", "host": CONVERGED, "data": {}, "plan": {}},
    {"id": "converged GB200 tray, driver install and reboot allowed",
     "host": CONVERGED, "data": INSTALL_AND_REBOOT, "plan": {}},
    {"id": "converged H200 box (real GPU capture)",
     "host": {**CONVERGED, "gpus": H200_BOX, "module": MODULE_H200, "cdi_driver": "580.159.04"},
     "data": {}, "plan": {}},
    {"id": "daemon.json drifted: rewrite it and restart docker, nothing else",
     "host": {**CONVERGED, "files": {DAEMON_JSON: DRIFTED_DAEMON_JSON}}, "data": {},
     "plan": {NAMES["daemon.json"]: [f"upload {DAEMON_JSON}", f"chown root:root {DAEMON_JSON}",
                                     f"chmod 644 {DAEMON_JSON}"],
              NAMES["docker"]: ["systemctl restart docker.service"]}},
    {"id": "docker stopped and disabled: start and enable it, no restart",
     "host": {**CONVERGED, "docker": {"running": False, "enabled": False}}, "data": {},
     "plan": {NAMES["docker"]: ["systemctl start docker.service",
                                "systemctl enable docker.service"]}},
    {"id": "persistence off on one GPU",
     "host": {**CONVERGED, "gpus": persistence_off(GB200_TRAY, 2)}, "data": {},
     "plan": {NAMES["persistence"]: ["nvidia-smi -pm 1"]}},
    {"id": "CDI spec generated for an older driver",
     "host": {**CONVERGED, "cdi_driver": "575.57.08"}, "data": {},
     "plan": {NAMES["cdi"]: [GENERATE_CDI]}},
    {"id": "driver 570, install off: the check fails, no driver command",
     "host": OLD_DRIVER, "data": {},
     "plan": {NAMES["driver check"]: [re.compile(
         r"printf %s 'NVIDIA driver refused:\n"
         r"@fake/tray-01: nvidia_driver_min_branch: found driver 570\.133\.20 on GPU 0, 1, 2, 3; "
         r"need a driver of branch >= 580\n.*nvidia_driver_install = True.*' >&2 && exit 1",
         re.DOTALL)]}},
    {"id": "driver 570, install on, reboot off: install, no reboot",
     "host": OLD_DRIVER, "data": {"nvidia_driver_install": True},
     "plan": {NAMES["apt update"]: ["apt-get update"],
              NAMES["apt check"]: [apt_check("nvidia-driver-580-open")],
              NAMES["driver"]: [f"{APT_INSTALL} nvidia-driver-580-open"]}},
    {"id": "driver 570, install on, reboot on: install, then reboot",
     "host": OLD_DRIVER, "data": INSTALL_AND_REBOOT,
     "plan": {NAMES["apt update"]: ["apt-get update"],
              NAMES["apt check"]: [apt_check("nvidia-driver-580-open")],
              NAMES["driver"]: [f"{APT_INSTALL} nvidia-driver-580-open"],
              NAMES["reboot"]: REBOOT}},
    {"id": "driver 580 installed but 570 still loaded, reboot on: no reboot (install unchanged)",
     "host": {**OLD_DRIVER, "packages": CONVERGED["packages"]}, "data": INSTALL_AND_REBOOT,
     "plan": {}},
    {"id": "offline host, everything installed, daemon.json absent: no apt-get update",
     "host": {**CONVERGED, "files": {}}, "data": {},
     "plan": {NAMES["daemon.json"]: ["mkdir -p /etc/docker", "chown root:root /etc/docker",
                                     f"upload {DAEMON_JSON}", f"chown root:root {DAEMON_JSON}",
                                     f"chmod 644 {DAEMON_JSON}"],
              NAMES["docker"]: ["systemctl restart docker.service"]}},
]


def command_text(command) -> str:
    return command.get_raw_value() if isinstance(command, StringCommand) else command


def fake_responses(spec: dict) -> dict[str, list[str]]:
    """What each fact command prints on a host in the state ``spec`` describes, keyed by the
    fact's own command (the connector matches it as a substring of what pyinfra sends)."""
    answers: dict[str, list[str]] = {}

    def answer(fact, output: list[str], **arguments) -> None:
        answers[fact_command(fact, **arguments)] = output

    answer(NvidiaGpus, spec["gpus"])
    # The GPUs on the PCI bus, driver or no driver: a tray's four unless the spec says.
    answer(NvidiaPciGpus, spec.get("pci", TRAY_PCI))
    answer(NvidiaKernelModuleVersion, [spec["module"]] if spec["module"] else [])
    answer(CdiSpecDriverVersion,
           [f"libcuda.so.{spec['cdi_driver']}"] if spec["cdi_driver"] else [], path=CDI_SPEC)
    # Asked by name (tasks.facts.DebPackagesInstalled) for whichever packages: one answer for
    # every list (its output lines are read by name); pyinfra's apt.packages reads DebPackages.
    asked_by_name = fact_command(DebPackagesInstalled, packages=[]).split(" -- ")[0]
    answers[asked_by_name] = [f"ii \t{name}\t{version}"
                              for name, version in spec["packages"].items()]
    answer(DebPackages, [f"ii  {name}  {version}  arm64  (description)"
                         for name, version in spec["packages"].items()])
    running, enabled = spec["docker"]["running"], spec["docker"]["enabled"]
    answer(SystemdStatus, ["Id=docker.service", f"SubState={'running' if running else 'dead'}"],
           services=["docker.service"])
    answer(SystemdEnabled, ["Id=docker.service",
                            f"UnitFileState={'enabled' if enabled else 'disabled'}"],
           services=["docker.service"])
    for path, content in spec["files"].items():
        folder = path.rsplit("/", 1)[0]
        answer(File, [f"user=root group=root mode=-rw-r--r-- atime=0 mtime=0 ctime=0 "
                      f"size={len(content)} '{path}'"], path=path)
        answer(Sha1File, [f"{hashlib.sha1(content.encode()).hexdigest()}  {path}"], path=path)
        answer(Directory, [f"user=root group=root mode=drwxr-xr-x atime=0 mtime=0 ctime=0 "
                           f"size=4096 '{folder}'"], path=folder)
    return answers


def prepared(spec: dict, data: dict):
    """A State with nvidia.prepare added for one fake host in state ``spec``: prepare only."""
    host_data = {**group_data("gb200"), **DATA, **data,
                 "fake_responses": fake_responses(spec), "fake_delay": 0, "fake_delay_jitter": 0}
    inventory = Inventory(([(f"@fake/{HOST}", host_data)], {}))
    state = State(inventory, Config())
    connect_all(state)
    add_deploy(state, nvidia.prepare)
    return state, inventory.get_host(f"@fake/{HOST}")


def describe(command) -> str:
    if isinstance(command, FileUploadCommand):
        return f"upload {command.dest}"
    if isinstance(command, FunctionCommand):
        return f"call {command.function.__name__}"
    return command_text(command)


def plan(state, host) -> dict[str, list[str]]:
    """{operation name: commands} for every operation that would change something."""
    return planned_commands(state, host, describe)


def matches(expected, actual: str) -> bool:
    if callable(expected):
        return expected(actual)
    if isinstance(expected, re.Pattern):
        return expected.fullmatch(actual) is not None
    return expected == actual


@pytest.mark.parametrize("case", CASES, ids=[case["id"] for case in CASES])
def test_plan(case):
    state, host = prepared(case["host"], case["data"])
    planned = plan(state, host)
    assert list(planned) == [name for name in NAMES.values() if name in case["plan"]], planned
    for name, expected in case["plan"].items():
        actual = planned[name]
        assert len(actual) == len(expected) and all(map(matches, expected, actual)), \
            f"{name}:\n  expected {expected}\n  actual   {actual}"
    assert state.get_meta_for_host(host).ops_change == len(case["plan"])
    assert not any("nvidia-driver" in command or "reboot" in command
                   for name, commands in planned.items() if name not in
                   (NAMES["driver"], NAMES["reboot"], NAMES["apt check"])
                   for command in commands)


def bound(fact: type, kwargs: dict) -> tuple:
    """A fact and its arguments as its command binds them, defaults filled in."""
    arguments = inspect.signature(fact().command).bind(**kwargs)
    arguments.apply_defaults()
    return fact, repr(sorted(arguments.arguments.items()))


@pytest.mark.parametrize("spec", [CONVERGED, {**CONVERGED, "gpus": H200_BOX,
                                              "module": MODULE_H200, "cdi_driver": "580.159.04"},
                                  {**CONVERGED, "pci": [], "gpus": [], "files": {
                                      DAEMON_JSON: daemon_json(DATA["docker_daemon_settings"],
                                                               gpus=False)}}],
                         ids=["GB200 tray", "H200 box", "no GPU (the sandbox)"])
def test_a_converged_host_reads_only_the_facts_prepare_lists(spec, monkeypatch):
    """What prepare() and its operations read where all is in place is in facts_read(): asked
    together in one command (tasks/facts_together.py); a fact missing from it would be asked
    alone, one more command a tray on every run."""
    read = []
    ask = Host.get_fact

    def recorded(self, fact, *args, **kwargs):
        read.append(bound(fact, kwargs))
        return ask(self, fact, *args, **kwargs)

    monkeypatch.setattr(Host, "get_fact", recorded)
    state, host = prepared(spec, {})
    assert plan(state, host) == {}
    settings = nvidia.read_nvidia_settings(host.name, host.data)
    listed = {bound(fact, kwargs) for fact, kwargs in nvidia.facts_read(settings)}
    assert read and not [fact for fact in read if fact not in listed], read


def test_daemon_json_adds_the_nvidia_runtime_as_nvidia_ctk_writes_it():
    written = json.loads(daemon_json({"log-driver": "local",
                                      "runtimes": {"crun": {"path": "/usr/bin/crun"}}}))
    assert written == {"log-driver": "local",
                       "runtimes": {"crun": {"path": "/usr/bin/crun"},
                                    "nvidia": {"args": [], "path": "nvidia-container-runtime"}}}
    # Sorted keys and a final newline: the same data gives the same bytes, run after run.
    assert daemon_json({"b": 1, "a": 2}) == daemon_json({"a": 2, "b": 1})
    assert daemon_json({}).endswith("}\n")


def test_daemon_json_the_task_uploads_is_the_one_rendered_from_data():
    state, host = prepared(BARE, {"docker_daemon_settings": {"data-root": "/raid/docker"}})
    uploaded = uploaded_daemon_json(state, host)
    assert uploaded["data-root"] == "/raid/docker"
    assert uploaded["runtimes"]["nvidia"]["path"] == "nvidia-container-runtime"
    assert "log-opts" not in uploaded


@pytest.mark.parametrize("gpus, problems", [
    (H200_BOX, []),
    (GB200_TRAY, []),
    (with_driver(GB200_TRAY, "570.133.20"),
     ["tray-01: nvidia_driver_min_branch: found driver 570.133.20 on GPU 0, 1, 2, 3; "
      "need a driver of branch >= 580"]),
    (with_driver(GB200_TRAY[:2], "570.133.20") + GB200_TRAY[2:],
     ["tray-01: nvidia_driver_min_branch: found driver 570.133.20 on GPU 0, 1; "
      "need a driver of branch >= 580"]),
    ([], ["tray-01: nvidia_driver_min_branch: found no GPU visible to nvidia-smi (no NVIDIA "
          "driver loaded); need a driver of branch >= 580"]),
], ids=["h200-580", "gb200-580", "gb200-570", "mixed", "no-driver"])
def test_driver_problems(gpus, problems):
    assert driver_problems(NvidiaGpus().process(gpus), 580, "tray-01") == problems


def test_driver_problems_follow_the_minimum_branch():
    gpus = NvidiaGpus().process(GB200_TRAY)
    assert driver_problems(gpus, 575, HOST) == []
    assert "need a driver of branch >= 590" in driver_problems(gpus, 590, HOST)[0]


def test_install_on_reboot_off_warns_that_the_driver_loads_at_the_next_reboot(caplog):
    with caplog.at_level(logging.WARNING, logger="pyinfra"):
        prepared(OLD_DRIVER, {"nvidia_driver_install": True})
    assert "nvidia-driver-580-open loads at the next reboot" in caplog.text


def test_installed_but_not_loaded_driver_is_reported(caplog):
    with caplog.at_level(logging.WARNING, logger="pyinfra"):
        prepared({**OLD_DRIVER, "packages": CONVERGED["packages"]}, INSTALL_AND_REBOOT)
    assert "is installed but is not the driver loaded now: reboot the host" in caplog.text


@pytest.mark.parametrize("module, installed, stale", [
    (MODULE_580, "580.95.05-0ubuntu0.24.04.2", False),
    (MODULE_570, "580.95.05-0ubuntu0.24.04.2", True),
    (None, "580.95.05-0ubuntu0.24.04.2", True),
    (MODULE_580, None, True),
], ids=["loaded-is-installed", "old-loaded", "none-loaded", "not-installed"])
def test_the_reboot_waits_on_the_loaded_module_differing_from_the_package(module, installed,
                                                                          stale):
    packages = {"nvidia-driver-580-open": installed} if installed else {}
    state, host = prepared({**CONVERGED, "module": module, "packages": packages}, {})
    with ctx_state.use(state), ctx_host.use(host):
        assert nvidia.loaded_driver_is_stale("nvidia-driver-580-open") is stale


def test_a_bare_host_deploys_through_the_fake_connector():
    state, host = prepared(BARE, {})
    run_ops(state)
    assert state.failed_hosts == set()
    sent = host.connector.executed_commands
    for command in ("apt-get update", "nvidia-ctk cdi generate", "nvidia-smi -pm 1",
                    "systemctl enable docker.service"):
        assert any(command in line for line in sent), command


def test_bad_data_names_every_key():
    with pytest.raises(DataError) as error:
        nvidia.read_nvidia_settings(HOST, {**DEFAULTS, "docker_daemon_settings": {"x": {1, 2}},
                                    "nvidia_driver_install": "yes",
                                    "nvidia_driver_min_branch": None})
    assert sorted(f"{problem.host}: {problem.key}" for problem in error.value.problems) == [
        "tray-01: docker_daemon_settings", "tray-01: nvidia_driver_install",
        "tray-01: nvidia_driver_min_branch"]


@pytest.mark.parametrize("output, version", [
    ([MODULE_H200, "GCC version:  gcc version 15.3.0 (GCC) "], "580.159.04"),
    ([MODULE_570], "570.133.20"),
    # The proprietary module's wording (no "Open", architecture before "Kernel Module").
    (["NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.144.03  Mon Dec 30 17:44:08 UTC 2024"],
     "550.144.03"),
    ([], None),
], ids=["h200-real", "open-570", "proprietary", "no-module"])
def test_kernel_module_version(output, version):
    fact = NvidiaKernelModuleVersion()
    assert (fact.process(output) if output else fact.default()) == version


def test_cdi_spec_driver_version_skips_the_unversioned_libcuda(tmp_path):
    # Shaped like `nvidia-ctk cdi generate` output: its symlink hook names libcuda.so.1
    # before the mounts name the versioned library.
    spec = tmp_path / "nvidia.yaml"
    spec.write_text(
        "cdiVersion: 0.5.0\nkind: nvidia.com/gpu\ncontainerEdits:\n  hooks:\n"
        "  - hookName: createContainer\n    path: /usr/bin/nvidia-cdi-hook\n    args:\n"
        "    - create-symlinks\n    - --link\n"
        "    - libcuda.so.1::/usr/lib/aarch64-linux-gnu/libcuda.so\n  mounts:\n"
        "  - hostPath: /usr/lib/aarch64-linux-gnu/libcuda.so.580.95.05\n"
        "    containerPath: /usr/lib/aarch64-linux-gnu/libcuda.so.580.95.05\n")
    fact = CdiSpecDriverVersion()
    for path, version in ((spec, "580.95.05"), (tmp_path / "absent.yaml", None)):
        output = subprocess.run(command_text(fact.command(path=str(path))), shell=True,
                                capture_output=True, text=True, check=True).stdout.splitlines()
        assert (fact.process(output) if output else fact.default()) == version


APT_CACHE_STUB = """#!/bin/sh
# Shaped like `apt-cache policy` on this Debian machine: docker.io offered, the toolkit unknown
# (no NVIDIA repository configured: apt prints nothing), the driver known but not offered.
case "$2" in
docker.io) echo 'docker.io:'; echo '  Candidate: 20.10.24+dfsg1-1+deb12u1+b6' ;;
nvidia-driver-580-open) echo 'nvidia-driver-580-open:'; echo '  Candidate: (none)' ;;
esac
"""


def test_a_package_no_apt_source_offers_is_named_with_where_it_comes_from(tmp_path):
    stub = tmp_path / "apt-cache"
    stub.write_text(APT_CACHE_STUB)
    stub.chmod(0o755)
    no_driver = {**BARE, "gpus": [], "module": None, "packages": {"curl": "8.5.0-2ubuntu10.6"}}
    state, host = prepared(no_driver, {"nvidia_driver_install": True})
    (script,) = plan(state, host)[NAMES["apt check"]]
    result = subprocess.run(script, shell=True, capture_output=True, text=True,
                            env={"PATH": f"{tmp_path}:/usr/bin:/bin"})
    assert result.returncode == 1
    reported = result.stderr.splitlines()
    assert [line.split(" ")[0] for line in reported] == ["nvidia-container-toolkit",
                                                        "nvidia-driver-580-open"]
    assert "the NVIDIA Container Toolkit apt repository" in reported[0]
    assert "adds no repositories" in reported[0]


def test_the_candidate_check_passes_when_apt_offers_everything(tmp_path):
    stub = tmp_path / "apt-cache"
    stub.write_text("#!/bin/sh\nprintf '%s:\\n  Candidate: 1.0-1\\n' \"$2\"\n")
    stub.chmod(0o755)
    state, host = prepared(BARE, {})
    (script,) = plan(state, host)[NAMES["apt check"]]
    result = subprocess.run(script, shell=True, capture_output=True, text=True,
                            env={"PATH": f"{tmp_path}:/usr/bin:/bin"})
    assert (result.returncode, result.stderr) == (0, "")


def test_a_host_without_gpus_gets_docker_only_whatever_the_model():
    """GPU presence is the host's own answer (NvidiaPciGpus), not the model profile's: a bare
    host with no NVIDIA device on its PCI bus and data naming Kimi-K2.6 gets Docker and a
    daemon.json without the nvidia runtime, and nothing of the NVIDIA layer."""
    cpu_box = {**BARE, "gpus": [], "pci": [], "module": None, "cdi_driver": None}
    state, host = prepared(cpu_box, {"model_profile": "kimi-k2.6", "docker_daemon_settings": {}})
    changes = plan(state, host)
    assert "Install Docker" in changes
    assert not {NAMES[key] for key in ("driver check", "packages", "cdi", "persistence")} \
        & set(changes)
    assert uploaded_daemon_json(state, host) == {}  # the defaults: no "runtimes" entry


def uploaded_daemon_json(state, host) -> dict:
    """The daemon.json nvidia.prepare would upload to ``host``, parsed."""
    with ctx_state.use(state), ctx_host.use(host):
        for op_hash in state.get_op_order():
            for command in state.get_op_data_for_host(host, op_hash).command_generator():
                if isinstance(command, FileUploadCommand) and command.dest == DAEMON_JSON:
                    command.src.seek(0)
                    return json.loads(command.src.read())
    raise AssertionError(f"no upload of {DAEMON_JSON}")
