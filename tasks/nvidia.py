"""The host layer the docker runtime needs on a GPU host: Docker, the NVIDIA Container Toolkit,
GPUs handed to containers, persistence mode, and a driver no older than the minimum branch.

The driver check is a pure function of the GPU fact, `driver_problems`, tested as data; the
@deploy reads the facts and yields only the commands that close the gap, so a converged host
gets none, and an offline host that has every package never touches the network.
"""

from __future__ import annotations

import io
import json
import shlex
from dataclasses import dataclass

from pyinfra import host, logger
from pyinfra.api import QuoteString, StringCommand, deploy, operation
from pyinfra.facts.files import Directory
from pyinfra.operations import apt, files, server, systemd

from tasks import data_keys, facts_together
from tasks.facts import (CdiSpecDriverVersion, DebPackagesInstalled, NvidiaGpus,
                         NvidiaKernelModuleVersion, NvidiaPciGpus)
from tasks.operations import failing_command

DAEMON_JSON_DIR = "/etc/docker"
DAEMON_JSON = f"{DAEMON_JSON_DIR}/daemon.json"
CDI_SPEC = "/etc/cdi/nvidia.yaml"
# Generated beside /etc/cdi, not in it: every CDI reader (Docker among them) rejects two specs
# naming the same devices in one folder, so a half-done spec there would break both.
CDI_SPEC_PARTIAL_DIR = "/etc/cdi-nvidia.partial"
# The entry `nvidia-ctk runtime configure --runtime=docker` writes, key for key (it writes no
# default-runtime unless asked): `docker run --runtime=nvidia` then goes through NVIDIA's
# runtime shim, which hands the GPUs to the container.
NVIDIA_RUNTIME = {"nvidia": {"args": [], "path": "nvidia-container-runtime"}}
# A Grace-Blackwell tray takes minutes to come back (firmware, ~1 TB of memory, 4 GPUs):
# pyinfra's 300 s default would give up on a healthy boot.
REBOOT_DELAY_S = 60
REBOOT_TIMEOUT_S = 1800
# Where each package comes from, for the message when apt offers none; this task adds no apt
# sources: the operator owns them (a mirror, an offline site's local repository).
PACKAGE_SOURCES = {
    "docker": "the distribution archive (Ubuntu: universe), or set docker_package to the package "
              "of the Docker apt source configured on the host",
    "toolkit": "the NVIDIA Container Toolkit apt repository, which must be configured on the "
               "host (see the NVIDIA Container Toolkit install guide; this deploy adds no "
               "repositories)",
    "driver": "the distribution restricted archive or the NVIDIA CUDA apt repository, configured "
              "on the host (this deploy adds no repositories)",
}

@dataclass(frozen=True)
class NvidiaSettings:
    docker_package: str
    docker_daemon_settings: dict
    toolkit_package: str
    driver_min_branch: int
    driver_install: bool
    driver_package: str
    driver_allow_reboot: bool


def read_nvidia_settings(host_name: str, data) -> NvidiaSettings:
    """This task's data keys, checked (tasks/data_keys.py); DataError holds every problem."""
    values = data_keys.read(host_name, data)
    docker_package, daemon = values["docker_package"], values["docker_daemon_settings"]
    toolkit = values["nvidia_container_toolkit_package"]
    branch, install = values["nvidia_driver_min_branch"], values["nvidia_driver_install"]
    driver_package = values["nvidia_driver_package"]
    allow_reboot = values["nvidia_driver_allow_reboot"]
    return NvidiaSettings(
        docker_package=docker_package, docker_daemon_settings=daemon, toolkit_package=toolkit,
        driver_min_branch=branch, driver_install=install, driver_package=driver_package,
        driver_allow_reboot=allow_reboot)


def driver_problems(gpus: list[dict], min_branch: int, host_name: str) -> list[str]:
    """Why the loaded driver cannot serve, one line each naming the host, the data key, what
    was found and what is needed; ``[]`` when every GPU runs a driver of ``min_branch`` or
    newer. ``gpus`` is tasks.facts.NvidiaGpus: empty when no driver is loaded."""
    key = "nvidia_driver_min_branch"
    need = f"a driver of branch >= {min_branch}"
    if not gpus:
        return [f"{host_name}: {key}: found no GPU visible to nvidia-smi (no NVIDIA driver "
                f"loaded); need {need}"]
    problems = []
    for driver in sorted({gpu["driver"] for gpu in gpus}):
        branch = driver.split(".")[0]
        if branch.isdigit() and int(branch) >= min_branch:
            continue
        indexes = ", ".join(str(gpu["index"]) for gpu in gpus if gpu["driver"] == driver)
        problems.append(f"{host_name}: {key}: found driver {driver} on GPU {indexes}; "
                        f"need {need}")
    return problems


def daemon_json(settings: dict, gpus: bool = True) -> str:
    """/etc/docker/daemon.json: the data's settings plus, on GPU hosts, the nvidia runtime,
    laid out as nvidia-ctk lays it out (sorted keys, 4-space indent).

    Built here rather than from a template: the content is data turned into JSON, and JSON has
    no comments, while dockerd refuses to start on a key it does not know (a "managed by" key
    such as "//" would stop Docker), so a template would add nothing but a way to break it.
    """
    if not gpus:
        return json.dumps(settings, indent=4, sort_keys=True) + "\n"
    runtimes = {**settings.get("runtimes", {}), **NVIDIA_RUNTIME}
    return json.dumps({**settings, "runtimes": runtimes}, indent=4, sort_keys=True) + "\n"


def package_names(specs: list[str]) -> list[str]:
    """The package names of ``specs`` (``name`` or ``name=version``, as apt.packages takes
    them), sorted: what tasks.facts.DebPackagesInstalled is asked for."""
    return sorted({spec.partition("=")[0] for spec in specs})


def missing_packages(wanted: list[str], installed: dict[str, str]) -> list[str]:
    """The entries of ``wanted`` (``name`` or ``name=version``) that ``installed``
    (tasks.facts.DebPackagesInstalled: name -> version) does not show installed."""
    missing = []
    for spec in wanted:
        name, _, version = spec.partition("=")
        if name not in installed or (version and version != installed[name]):
            missing.append(spec)
    return missing


def installed_packages(settings: NvidiaSettings) -> dict[str, str]:
    """Which of the packages this task may install the host has (name -> version), asked
    once for all of them, whichever the host needs."""
    return host.get_fact(DebPackagesInstalled, packages=package_names(_package_specs(settings)))


def _package_specs(settings: NvidiaSettings) -> list[str]:
    return [settings.docker_package, settings.toolkit_package, settings.driver_package]


def upstream_version(debian_version: str) -> str:
    """580.95.05 from 1:580.95.05-0ubuntu0.24.04.2: what the kernel module reports."""
    return debian_version.split(":", 1)[-1].split("-", 1)[0]


def loaded_driver_is_stale(package: str) -> bool:
    """True when the loaded kernel module is not the version of the installed driver package:
    the new driver waits for a reboot."""
    loaded = host.get_fact(NvidiaKernelModuleVersion)
    name = package.partition("=")[0]
    installed = host.get_fact(DebPackagesInstalled, packages=[name]).get(name)
    return installed is None or loaded != upstream_version(installed)


@operation()
def driver_accepted(problems: list[str]):
    """
    Fail, printing every driver problem, when there are any; otherwise change nothing.

    + problems: lines from driver_problems

    **Example:**

    .. code:: python

        driver_accepted(name="Check NVIDIA driver branch", problems=[])
    """
    if not problems:
        host.noop("the loaded NVIDIA driver is recent enough")
        return
    message = ("NVIDIA driver refused:\n" + "\n".join(problems) + "\nInstall a newer driver, "
               "or set nvidia_driver_install = True to install nvidia_driver_package.\n")
    yield failing_command(message)


@operation()
def apt_candidates_present(sources: dict[str, str]):
    """
    Fail, naming each package and where it comes from, when apt offers no version of a package
    that is not installed yet; installed packages are not looked up at all.

    + sources: package (``name`` or ``name=version``) -> where it comes from, for the message

    Run it after the package lists are refreshed: it reads them at execution time.

    **Example:**

    .. code:: python

        apt_candidates_present(name="Check apt offers the missing packages",
                               sources={"nvidia-container-toolkit": "NVIDIA's repository"})
    """
    missing = missing_packages(
        list(sources), host.get_fact(DebPackagesInstalled, packages=package_names(list(sources))))
    if not missing:
        host.noop(f"installed: {', '.join(sources)}")
        return
    checks = []
    for spec in missing:
        name = spec.partition("=")[0]
        message = f"{spec} is not installed and no apt source offers it: {sources[spec]}"
        # LC_ALL=C: apt-cache translates its "Candidate:" label.
        checks.append(f"LC_ALL=C apt-cache policy {shlex.quote(name)} 2>/dev/null "
                      f"| grep -q '^ *Candidate: [^(]' "
                      f"|| {{ echo {shlex.quote(message)} >&2; missing=1; }}")
    script = "missing=0; " + "; ".join(checks) + "; exit $missing"
    yield StringCommand("sh", "-c", QuoteString(script))


@operation()
def cdi_spec_generated(path: str):
    """
    Make ``path`` a CDI spec of this host's GPUs for the driver loaded now.

    + path: the spec file, under /etc/cdi

    Regenerated only when it is absent or was generated for another driver version (its
    library mounts name the driver's version, so an old spec mounts files that no longer
    exist). Docker re-reads CDI specs when they change: no restart. Toolkits from 1.18 also
    keep a spec under /var/run/cdi (their nvidia-cdi-refresh service) that wins over this one;
    both then describe the same driver, and this one serves toolkits without that service.

    **Example:**

    .. code:: python

        cdi_spec_generated(name="Generate CDI spec", path="/etc/cdi/nvidia.yaml")
    """
    gpus = host.get_fact(NvidiaGpus)
    if not gpus:
        host.noop(f"no GPU visible to nvidia-smi: {path} waits for a loaded driver")
        return
    driver = gpus[0]["driver"]
    if host.get_fact(CdiSpecDriverVersion, path=path) == driver:
        host.noop(f"{path} is for driver {driver}")
        return
    partial = f"{CDI_SPEC_PARTIAL_DIR}/{path.rsplit('/', 1)[-1]}"
    folder = path.rsplit("/", 1)[0] or "/"
    yield StringCommand(
        "mkdir", "-p", QuoteString(folder), QuoteString(CDI_SPEC_PARTIAL_DIR), "&&",
        "nvidia-ctk", "cdi", "generate", QuoteString(f"--output={partial}"), "&&",
        "mv", "-f", QuoteString(partial), QuoteString(path), "&&",
        "rmdir", QuoteString(CDI_SPEC_PARTIAL_DIR))


@operation()
def persistence_mode_on():
    """
    Turn persistence mode on for every GPU when nvidia-smi shows any with it off.

    Without it the driver tears a GPU down whenever no process holds it and sets it up again
    for the next one, which slows every start of the server. ``nvidia-smi -pm 1`` lasts until
    the next reboot; every deploy checks it again.

    **Example:**

    .. code:: python

        persistence_mode_on(name="Turn on persistence mode on every GPU")
    """
    gpus = host.get_fact(NvidiaGpus)
    off = [gpu["index"] for gpu in gpus if not gpu["persistence"]]
    if not off:
        host.noop(f"persistence mode is on for all {len(gpus)} GPU(s)")
        return
    yield "nvidia-smi -pm 1"


def facts_read(settings: NvidiaSettings) -> list[tuple[type, dict]]:
    """The facts prepare()'s operations read on a host where all is in place (to be asked
    together: tasks/facts_together.py); the GPU facts too on a host without GPUs, where they
    are a few lines of output."""
    return [(NvidiaPciGpus, {}), (NvidiaGpus, {}),
            (DebPackagesInstalled, {"packages": package_names(_package_specs(settings))}),
            *facts_together.written_file(DAEMON_JSON), (Directory, {"path": DAEMON_JSON_DIR}),
            *facts_together.service("docker.service"),
            (CdiSpecDriverVersion, {"path": CDI_SPEC})]


@deploy("NVIDIA container host")
def prepare() -> None:
    """Converge a GPU host to run vLLM's container: Docker installed, enabled and running with
    the nvidia runtime in a managed daemon.json (restarted only when that file changes), the
    NVIDIA Container Toolkit installed, a CDI spec for the loaded driver, persistence mode on,
    and a driver of at least the minimum branch (installed only on request, rebooting only on
    request).

    Whether the host has GPUs is the host's own answer (tasks.facts.NvidiaPciGpus: NVIDIA
    devices on its PCI bus, driver or no driver); a host without (CPU builds of vLLM: the
    sandbox) gets Docker and its daemon.json only.

    Data keys: docker_package, docker_daemon_settings, nvidia_container_toolkit_package,
    nvidia_driver_min_branch, nvidia_driver_install, nvidia_driver_package,
    nvidia_driver_allow_reboot.
    """
    settings = read_nvidia_settings(host.name, host.data)
    facts_together.ask_together(host, facts_read(settings))
    gpus = bool(host.get_fact(NvidiaPciGpus))
    install_driver = _packages_installed(settings, gpus)
    if install_driver:
        _driver_installed(settings)
    daemon = files.put(name=f"Install Docker daemon settings {DAEMON_JSON}",
                       src=io.StringIO(daemon_json(settings.docker_daemon_settings, gpus)),
                       dest=DAEMON_JSON, user="root", group="root", mode="644")
    systemd.service(name="Enable and start docker.service, restart it if daemon.json changed",
                    service="docker.service", running=True, enabled=True,
                    restarted=daemon.will_change)
    if gpus:
        cdi_spec_generated(name=f"Generate CDI spec {CDI_SPEC} for the loaded driver",
                           path=CDI_SPEC)
        persistence_mode_on(name="Turn on persistence mode on every GPU")


def _packages_installed(settings: NvidiaSettings, gpus: bool) -> bool:
    """Docker, and on a GPU host the toolkit and (when asked and needed) the driver, from the
    apt sources the operator configured; True when the driver is to be installed."""
    sources = {settings.docker_package: PACKAGE_SOURCES["docker"]}
    install_driver = False
    if gpus:
        problems = driver_problems(host.get_fact(NvidiaGpus), settings.driver_min_branch,
                                   host.name)
        install_driver = settings.driver_install and bool(problems)
        if not settings.driver_install:
            driver_accepted(name="Check NVIDIA driver branch", problems=problems)
        sources[settings.toolkit_package] = PACKAGE_SOURCES["toolkit"]
    if install_driver:
        sources[settings.driver_package] = PACKAGE_SOURCES["driver"]
    if not missing_packages(list(sources), installed_packages(settings)):
        # Nothing more is asked (apt.packages would list every package of the host), and
        # offline hosts that already have everything never touch the network.
        return install_driver
    apt.update(name="Refresh apt package lists")
    apt_candidates_present(name="Check apt offers the packages not yet installed",
                           sources=sources)
    if gpus:
        apt.packages(name="Install Docker and the NVIDIA Container Toolkit",
                     packages=[settings.docker_package, settings.toolkit_package])
    else:
        apt.packages(name="Install Docker", packages=[settings.docker_package])
    return install_driver


def _driver_installed(settings: NvidiaSettings) -> None:
    """The driver package installed; a reboot into it only when data allows one."""
    package = settings.driver_package
    driver = apt.packages(name=f"Install NVIDIA driver {package}", packages=[package])
    if not driver.will_change:
        logger.warning(f"{host.name}: {package} is installed but is not the driver loaded "
                       "now: reboot the host (nvidia_driver_allow_reboot reboots only in "
                       "the run that installs the driver)")
    elif not settings.driver_allow_reboot:
        logger.warning(f"{host.name}: {package} loads at the next reboot "
                       "(nvidia_driver_allow_reboot is False)")
    else:
        # Checked again when the reboot is due: the package may bring the very version
        # that is loaded already, and then a reboot gains nothing.
        server.reboot(name="Reboot into the NVIDIA driver just installed",
                      delay=REBOOT_DELAY_S, reboot_timeout=REBOOT_TIMEOUT_S,
                      _if=[driver.did_change, lambda: loaded_driver_is_stale(package)])
