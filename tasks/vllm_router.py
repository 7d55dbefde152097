"""vllm-router on the hosts of the `router` group: one OpenAI endpoint in front of the trays.

vllm-router (the vLLM project's router, Rust, pinned, installed from a wheelhouse like the hf
CLI) runs as vllm-router.service and sends each request to one serving host of the inventory,
by prefix-cache affinity by default, probing every backend's /health and leaving out those that
fail. Clients send the trays' API key to the router: it forwards their Authorization header,
and the tray checks it. The router holds no secret of its own.

What the router does not protect: its admin routes (/add_worker, /remove_worker, /workers) take
no key at all, on the same port as the API. Hence it listens on loopback unless data says
router_accept_open_admin (tasks/data_keys.py); an operator calls them on the router host
itself (`curl -X POST 'http://127.0.0.1:30000/remove_worker?url=...'` drains a tray).
"""

from __future__ import annotations

import io
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from pyinfra import host
from pyinfra.api import deploy
from pyinfra.api.util import get_template
from pyinfra.facts.files import Sha1File
from pyinfra.operations import files, systemd

from tasks import data_keys, system, tls
from tasks.data_keys import LOOPBACK, DataError, Problem, problem
from tasks.facts import CpuArchitecture, PythonVersion
from tasks.inventory_check import address_of, serves
from tasks.models import systemd_exec_line
from tasks.operations import (content_differs, drop_ins_removed, service_healthy,
                              wheelhouse_venv_installed)
from tasks.preflight import HostFacts, wheelhouse_problems
from tasks.settings import pinned_wheelhouse, wheelhouse_platform

GROUP = "router"
UNIT_NAME = "vllm-router.service"
UNIT_PATH = f"/etc/systemd/system/{UNIT_NAME}"
# The CAs of the backends that serve TLS: public certificates, no key.
BACKENDS_CA = "/etc/vllm-router/backends-ca.pem"
TEMPLATE = Path(__file__).resolve().parent.parent / "templates" / "vllm-router.service.j2"
PACKAGES = ["python3-venv", "curl"]
# How long the router waits at start for its backends before serving with those that answer.
WORKER_STARTUP_TIMEOUT_S = 30
# The deploy's wait for every backend healthy behind the router: two probe rounds and margin.
HEALTH_WAIT_MARGIN_S = 60


@dataclass(frozen=True)
class RouterSettings:
    """What one router host runs, derived from its data and the inventory's serving hosts."""

    version: str
    venv_dir: str
    wheelhouse: str
    host: str
    port: int
    policy: str
    health_interval_s: int
    prometheus_port: int
    backends: tuple[str, ...]  # the serving hosts' base URLs, in inventory order
    backends_ca: str = ""  # PEM: the CAs of the backends that serve TLS (tasks/tls.py), if any

    @property
    def local_url(self) -> str:
        """The router's base URL from the router host itself."""
        address = "127.0.0.1" if self.host == "0.0.0.0" else self.host
        return f"http://{address}:{self.port}"

    @property
    def health_timeout_s(self) -> int:
        return WORKER_STARTUP_TIMEOUT_S + 2 * self.health_interval_s + HEALTH_WAIT_MARGIN_S


def backend_url(name: str, data) -> str:
    """A serving host's base URL as the router reaches it: vllm_backend_url, else
    http(s)://<ssh_hostname or its inventory name>:<vllm_port> (https when it serves TLS: the
    preflight checked that its certificate names that address)."""
    values = data_keys.as_dict(data)
    if values.get("vllm_backend_url"):
        return values["vllm_backend_url"]
    port = values.get("vllm_port", data_keys.DEFAULTS["vllm_port"])
    scheme = "https" if values.get("vllm_tls_cert_file") else "http"
    return f"{scheme}://{address_of(name, values)}:{port}"


def backends_of(group: str | None, hosts: Iterable[tuple[str, set[str], object]]) -> list:
    """(name, data) of the backends among `hosts` (name, groups, data): the hosts of `group`,
    or every serving host."""
    return [(name, data) for name, groups, data in hosts
            if (group in groups if group is not None else serves(groups))]


def settings_from(name: str, data, backends: list[tuple[str, dict]]) -> RouterSettings:
    """RouterSettings from a router host's data and its backends' (name, data); DataError
    names every problem: the router's own keys, its wheelhouse, the backends."""
    values = data_keys.read(name, data)
    problems: list[Problem] = []
    wheelhouse, found = pinned_wheelhouse(name, "router_wheelhouse_dir",
                                          values["router_wheelhouse_dir"], "vllm-router",
                                          values["router_version"], "router-wheelhouse")
    problems += found
    if not LOOPBACK.match(values["router_host"]) and not values["router_accept_open_admin"]:
        problems.append(problem(name, "router_host", values["router_host"],
                                "a loopback address, or router_accept_open_admin = True: the "
                                "router's admin routes take no key"))
    if not backends:
        problems.append(problem(name, "router_backend_group", values["router_backend_group"],
                                "a group with serving hosts in this inventory (it has none)"))
    urls, cas = [], []
    for backend, backend_data in backends:
        ca, found = tls.client_ca(backend, data_keys.as_dict(backend_data))
        problems += found
        if ca and ca not in cas:
            cas.append(ca)
        runtime = data_keys.as_dict(backend_data).get("vllm_runtime")
        if runtime == "kubernetes":
            problems.append(problem(backend, "vllm_runtime", runtime, "docker or venv on a "
                                    f"backend of router {name} (a pod has no address of the "
                                    "host's)"))
        urls.append(backend_url(backend, backend_data))
    if len(set(urls)) != len(urls):
        problems.append(problem(name, "router_backend_group", values["router_backend_group"],
                                f"backends with a URL each (found {urls})"))
    if problems:
        raise DataError(problems)
    return RouterSettings(
        version=values["router_version"], venv_dir=values["router_venv_dir"],
        wheelhouse=wheelhouse, host=values["router_host"], port=values["router_port"],
        policy=values["router_policy"],
        health_interval_s=values["router_health_check_interval_s"],
        prometheus_port=values["router_prometheus_port"], backends=tuple(urls),
        backends_ca="".join(cas))


def read_router_settings(router) -> RouterSettings:
    """RouterSettings of a pyinfra router host, its backends read from its inventory: every
    host of it, not only those a --limit picked (a roll-out that deploys one batch must not
    rewrite the router's list of the others)."""
    group = data_keys.as_dict(router.data).get("router_backend_group")
    hosts = [(other.name, set(map(str, other.groups)), other.data) for other in router.inventory]
    return settings_from(router.name, router.data, backends_of(group, hosts))


def router_argv(settings: RouterSettings) -> list[str]:
    """vllm-router's command line: everything it needs, and no secret (it has none)."""
    return [f"{settings.venv_dir}/bin/vllm-router",
            "--host", settings.host, "--port", str(settings.port),
            "--policy", settings.policy,
            "--worker-urls", *settings.backends,
            "--health-check-interval-secs", str(settings.health_interval_s),
            "--worker-startup-timeout-secs", str(WORKER_STARTUP_TIMEOUT_S),
            "--worker-startup-check-interval", "2",
            "--prometheus-host", "127.0.0.1", "--prometheus-port", str(settings.prometheus_port),
            "--log-level", "info"]


def unit_text(settings: RouterSettings) -> str:
    return get_template(str(TEMPLATE)).render(
        exec_start=systemd_exec_line(router_argv(settings)), backends=len(settings.backends),
        backends_ca=BACKENDS_CA if settings.backends_ca else None)


def backends_ca_placed(settings: RouterSettings) -> bool:
    """The backends' CAs where the router's TLS client reads them (SSL_CERT_FILE: vllm-router
    verifies https backends with OpenSSL's default paths), or no file without TLS backends;
    whether this run changes it."""
    if not settings.backends_ca:
        return files.file(name=f"No CA file of TLS backends {BACKENDS_CA}", path=BACKENDS_CA,
                          present=False).will_change
    files.put(name=f"Install the CAs of the TLS backends {BACKENDS_CA}",
              src=io.StringIO(settings.backends_ca), dest=BACKENDS_CA, user="root",
              group="root", mode="644")
    return content_differs(BACKENDS_CA, settings.backends_ca, fact=Sha1File)


def router_problems(router) -> list[str]:
    """What the preflight refuses on a router host: its data and backends (as
    read_router_settings names them), a wheelhouse for another CPU or Python than the host's
    (pip would fail half-way)."""
    try:
        settings = read_router_settings(router)
    except DataError as error:
        return [str(item) for item in error.problems]
    facts = HostFacts(arch=router.get_fact(CpuArchitecture),
                      python=router.get_fact(PythonVersion))
    return wheelhouse_problems(router.name, "router_wheelhouse_dir", "router-wheelhouse",
                               wheelhouse_platform(settings.wheelhouse), facts)


@deploy("vLLM router")
def install() -> None:
    """Converge vllm-router.service: the pinned router in its venv, the unit listing every
    backend, enabled and running (the preflight checked data, backends and wheelhouse);
    restart it only when the unit or the venv changed, and then wait until the router
    reports every backend healthy.

    Data keys: router_version, router_venv_dir, router_wheelhouse_dir, router_host,
    router_accept_open_admin, router_port, router_policy, router_health_check_interval_s,
    router_backend_group, router_prometheus_port; the backends' vllm_backend_url, ssh_hostname,
    vllm_port, and vllm_tls_cert_file / vllm_tls_ca_file (https, and the CAs it trusts).
    """
    settings = read_router_settings(host)
    system.packages_installed(PACKAGES)
    files.directory(name="Create router folder", path=str(Path(settings.venv_dir).parent),
                    user="root", group="root", mode="755")
    venv = wheelhouse_venv_installed(name=f"Install vllm-router {settings.version} into a venv",
                                     wheelhouse_dir=settings.wheelhouse,
                                     venv_link=settings.venv_dir)
    content = unit_text(settings)
    files.put(name=f"Install {UNIT_NAME} unit ({len(settings.backends)} backends)",
              src=io.StringIO(content), dest=UNIT_PATH, user="root", group="root", mode="644")
    drop_ins = drop_ins_removed(name=f"Remove local drop-ins of {UNIT_NAME}", unit=UNIT_NAME)
    ca_changed = backends_ca_placed(settings)
    changed = content_differs(UNIT_PATH, content, fact=Sha1File) or drop_ins.will_change
    service = systemd.service(
        name=f"Enable and start {UNIT_NAME}, restart if its unit or venv changed",
        service=UNIT_NAME, running=True, enabled=True,
        restarted=changed or venv.will_change or ca_changed, daemon_reload=changed)
    service_healthy(name="Wait for the router to report every backend healthy",
                    url=f"{settings.local_url}/health", timeout_s=settings.health_timeout_s,
                    unit=UNIT_NAME, when=service.will_change)
