"""Host data -> one derived view (`Settings`) that every serving task reads.

Each key is declared, with its default and what it needs, in tasks/data_keys.py, which checks
every value on its own. This module adds the rules that tie keys together or read the
controller's files (a wheelhouse's lock, the API key file, an image archive) and derives paths
and the rendered `vllm serve` command. Every problem, of either kind, is one
`tasks.data_keys.Problem` (`host: key: found X; need Y`), raised together in one `DataError`
before any operation runs.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import tarfile
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tasks import data_keys, secrets
from tasks.data_keys import DataError, Problem, problem
from tasks.inventory_check import address_of
from tasks.models import PROFILES, ModelProfile, vllm_serve_args
from tasks.tls import KEYS as TLS_KEYS
from tasks.tls import CA_FILE, TLS_DIR, Tls, read_tls, serve_flags

REPO = Path(__file__).resolve().parent.parent
# The Jinja templates of the units and manifests the tasks render, and where units go on a host.
TEMPLATES = REPO / "templates"
UNIT_DIR = "/etc/systemd/system"
ENV_FILE = "/etc/vllm/vllm.env"
UNIT_NAME = "vllm.service"
# Beyond vLLM's --shutdown-timeout, what a stop allows for the engine processes to exit once
# the in-flight requests are done (or aborted): then SIGKILL.
STOP_MARGIN_S = 30
# Offline by design, for every runtime (the systemd units, the pod) and the bench client: the
# weights are placed by the deploy, and nothing phones home.
OFFLINE_ENVIRONMENT = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
}


@dataclass(frozen=True)
class Settings:
    host_name: str
    profile: ModelProfile
    model_revision: str
    speculative: bool
    draft_repo: str
    weights_dir: str
    model_dir: str
    draft_dir: str | None
    model_source_dir: str | None
    runtime: str
    listen_host: str
    port: int
    api_key: str | None
    health_timeout_s: int
    shutdown_timeout_s: int  # vLLM's --shutdown-timeout: in-flight requests' time on SIGTERM
    venv_dir: str
    wheelhouse_dir: str | None
    environment: dict[str, str]
    serve_args: list[str]
    packages: list[str]
    tensor_parallel_size: int
    gpu_memory_utilization: float | None
    weights_bytes: int  # what the model folder holds when complete
    accept_low_gpu_memory: bool
    driver_min_branch: int
    driver_install: bool  # the deploy may install a driver (tasks/nvidia.py)
    wheelhouse_platform: dict[str, str]  # venv runtime: the wheelhouse's arch and python
    images: dict[str, str]  # docker runtime: `uname -m` -> pinned image reference
    image_tarball: str | None  # docker runtime: vllm_image_tarball, an absolute controller path
    image_archive: dict | None  # docker runtime: image_archive_info() of image_tarball
    container_gpus: str  # docker runtime: one of CONTAINER_GPU_MODES
    # serve_args_at(model_path=..., draft_path=...): serve_args with the weights at other paths
    serve_args_at: Callable[..., list[str]]
    tls: Tls | None = None  # vLLM's own TLS (tasks/tls.py); None: plain HTTP
    # With TLS, the name every client reaches vLLM by: the host's address, which the
    # preflight checked its certificate names (client_address).
    tls_name: str | None = None

    @property
    def stop_timeout_s(self) -> int:
        """What a stop waits for vLLM before SIGKILL: its drain, then its exit."""
        return self.shutdown_timeout_s + STOP_MARGIN_S

    @property
    def local_url(self) -> str:
        """vLLM's base URL as the host itself reaches it: with TLS by tls_name (curl sends
        it to loopback: local_curl_options)."""
        if self.tls is None:
            return f"http://127.0.0.1:{self.port}"
        return f"https://{self.tls_name}:{self.port}"

    @property
    def health_url(self) -> str:
        return f"{self.local_url}/health"

    @property
    def local_curl_options(self) -> list[str]:
        """curl's options for local_url: trust the CA, send the name to loopback."""
        if self.tls is None:
            return []
        return ["--cacert", f"{TLS_DIR}/{CA_FILE}",
                "--resolve", f"{self.tls_name}:{self.port}:127.0.0.1"]

    def image_for(self, arch: str) -> str | None:
        """The image a host of CPU `arch` (`uname -m`) runs; None when the data names none."""
        return self.images.get(arch)


def controller_path(value: str) -> str:
    """Controller paths in data are relative to the repository, not to the caller's cwd."""
    return str(value if os.path.isabs(value) else REPO / value)


def pinned_wheelhouse(host_name: str, key: str, folder: str, package: str, version: str,
                      builder: str) -> tuple[str, list[Problem]]:
    """`folder` (data key `key`) on the controller, and the problems if it holds no lock or no
    `package==version` (a wheelhouse made by the console script `builder`)."""
    wheelhouse = controller_path(folder)
    lock = Path(wheelhouse) / "requirements.lock"
    if not lock.is_file():
        return wheelhouse, [problem(host_name, key, wheelhouse,
                                    f"a folder with requirements.lock: run {builder}")]
    if not any(line.startswith(f"{package}=={version} ")
               for line in lock.read_text().splitlines()):
        return wheelhouse, [problem(host_name, key, wheelhouse,
                                    f"holds no {package} {version}: run {builder} "
                                    f"--version {version}")]
    return wheelhouse, []


def wheelhouse_platform(wheelhouse: str | None) -> dict[str, str]:
    """The `arch=` and `python=` wheelhouse and hf-wheelhouse write in their lock's
    first line ({} without a wheelhouse or such words): the hosts it can install on."""
    if not wheelhouse:
        return {}
    header = (Path(wheelhouse) / "requirements.lock").read_text().split("\n", 1)[0]
    values = dict(word.split("=", 1) for word in header.split() if "=" in word)
    return {key: values[key] for key in ("arch", "python") if key in values}


@functools.lru_cache(maxsize=8)
def _archive_info(path: str, size: int, mtime_ns: int) -> dict:
    with tarfile.open(path) as archive:
        # vllm-image writes manifest.json first, docker save last: stop once it is read.
        member = next((m for m in archive if m.name.removeprefix("./") == "manifest.json"), None)
        if member is None:
            raise ValueError("no manifest.json (not a `docker save` archive)")
        manifest = json.load(archive.extractfile(member))
        if not isinstance(manifest, list) or len(manifest) != 1:
            raise ValueError("manifest.json must describe exactly one image")
        # <id>.json (docker save before 25, vllm-image) or blobs/sha256/<id> (OCI layout).
        config_bytes = archive.extractfile(manifest[0]["Config"]).read()
    config = json.loads(config_bytes)
    return {"tags": list(manifest[0].get("RepoTags") or []),
            "image_id": f"sha256:{hashlib.sha256(config_bytes).hexdigest()}",
            "architecture": config.get("architecture"), "os": config.get("os")}


def image_archive_info(path: str) -> dict:
    """What a `docker save` archive holds, read from its manifest and image config:
    {"tags": [...], "image_id": "sha256:...", "architecture": "arm64", "os": "linux"}.
    Raises ValueError (or OSError) when the file is not such an archive."""
    stat = os.stat(path)
    try:
        return _archive_info(path, stat.st_size, stat.st_mtime_ns)
    except (tarfile.TarError, KeyError, TypeError, json.JSONDecodeError) as error:
        raise ValueError(f"not a `docker save` archive: {error}") from error


def _model_problems(name: str, values: dict, bad: set[str]) -> list[Problem]:
    """The model's rules across keys: the tensor parallel size against the profile's heads,
    commits for a profile that runs remote code, and a pushed model folder that holds a
    config."""
    found = []
    profile = _profile(values) if "model_profile" not in bad else None
    tp = values["vllm_tensor_parallel_size"]
    if profile and tp and "vllm_tensor_parallel_size" not in bad \
            and profile.attention_heads % tp:
        found.append(problem(name, "vllm_tensor_parallel_size", tp,
                             f"a divisor of the {profile.attention_heads} attention heads of "
                             f"{profile.name} (vLLM shards heads evenly)"))
    if profile and profile.trust_remote_code and not values["model_accept_moving_revision"]:
        pinned = [("model_revision", values["model_revision"] or profile.revision,
                   profile.repo)]
        if values["model_speculative"]:
            pinned.append(("model_draft_revision", values["model_draft_revision"],
                           values["model_draft_repo"]))
        found += [problem(name, key, revision,
                          f"a 40-hex commit of {repo}: profile {profile.name} runs the "
                          "repository's Python (--trust-remote-code), so pin the code you "
                          "reviewed; or model_accept_moving_revision = True")
                  for key, revision, repo in pinned
                  if key not in bad and not data_keys.COMMIT.match(str(revision))]
    source = values["model_source_dir"]
    if source is not None and "model_source_dir" not in bad \
            and not (Path(controller_path(source)) / "config.json").is_file():
        found.append(problem(name, "model_source_dir", controller_path(source),
                             "a model folder with config.json on the controller "
                             "(make-tiny-model)"))
    return found


def _profile(values: dict) -> ModelProfile:
    return PROFILES[values["model_profile"]]


def read_api_key(name: str, values: dict) -> tuple[str | None, list[Problem]]:
    """The API key from vllm_api_key_file or what vllm_api_key_command prints (None: the
    endpoint is open)."""
    key_file, command = values["vllm_api_key_file"], values["vllm_api_key_command"]
    found = secrets.one_source(name, "vllm_api_key_file", key_file, "vllm_api_key_command",
                               command)
    if found:
        return None, found
    if command is not None:
        return secrets.from_command(name, "vllm_api_key_command", command)
    if key_file is None:
        return None, []
    path = Path(os.path.expanduser(controller_path(key_file)))
    api_key = path.read_text().strip() if path.is_file() else ""
    if not api_key:
        return None, [problem(name, "vllm_api_key_file", key_file,
                              "a readable, non-empty file on the controller")]
    return api_key, []


def _wheelhouse(name: str, values: dict) -> tuple[str | None, list[Problem]]:
    """The venv runtime's wheelhouse folder (None on the other runtimes, which ignore it)."""
    if values["vllm_runtime"] != "venv":
        return None, []
    if values["vllm_wheelhouse_dir"] is None:
        return None, [problem(name, "vllm_wheelhouse_dir", None, "the venv runtime needs a "
                              "wheelhouse folder (wheelhouse)")]
    wheelhouse = controller_path(values["vllm_wheelhouse_dir"])
    if not (Path(wheelhouse) / "requirements.lock").is_file():
        return None, [problem(name, "vllm_wheelhouse_dir", wheelhouse,
                              "a folder with requirements.lock: run wheelhouse")]
    return wheelhouse, []


def _image_archive(name: str, values: dict) -> tuple[str | None, dict | None, list[Problem]]:
    """docker runtime: vllm_image_tarball, what it holds, and that it holds the images."""
    images = values["vllm_image"]
    if values["vllm_runtime"] != "docker":
        return None, None, []
    if not images:
        return None, None, [problem(name, "vllm_image", images, "the docker runtime needs an "
                                    "image for the host's CPU architecture")]
    if values["vllm_image_tarball"] is None:
        return None, None, []
    tarball = controller_path(values["vllm_image_tarball"])
    try:
        archive = image_archive_info(tarball)
    except (OSError, ValueError) as error:
        return None, None, [problem(name, "vllm_image_tarball", tarball,
                                    f"a readable `docker save` archive ({error})")]
    unknown = sorted(ref for ref in images.values() if ref not in archive["tags"])
    if unknown:
        return None, None, [problem(name, "vllm_image", unknown, f"the tags "
                                    f"vllm_image_tarball holds: {archive['tags']} (the unit "
                                    "runs the image by that name)")]
    return tarball, archive, []


# Each host's Settings with the data they were derived from: every task of a run asks, and the
# derivation reads controller files (the key, a wheelhouse's lock, an image archive).
_DERIVED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def read_settings(host) -> Settings:
    """Check a host's data (every key, then the rules across keys) and derive everything the
    serving tasks need, once per host and data; DataError holds every problem."""
    data = data_keys.as_dict(host.data)
    fingerprint = repr(sorted(data.items(), key=lambda item: item[0]))
    known = _DERIVED.get(host)
    if known is not None and known[0] == fingerprint:
        return known[1]
    values = {key.name: data.get(key.name) for key in data_keys.KEYS}
    settings = _checked_and_derived(host, values)
    _DERIVED[host] = (fingerprint, settings)
    return settings


def _checked_and_derived(host, values: dict) -> Settings:
    name = host.name
    problems = data_keys.check(name, host.data)
    bad = {item.key for item in problems}
    problems += _model_problems(name, values, bad)
    api_key, found = ((None, []) if {"vllm_api_key_file", "vllm_api_key_command"} & bad
                      else read_api_key(name, values))
    problems += found
    if not (found or api_key or {"vllm_api_key_file", "vllm_api_key_command"} & bad or values["vllm_accept_open_endpoint"] or "vllm_host" in bad
            or data_keys.LOOPBACK.match(values["vllm_host"])):
        problems.append(problem(name, "vllm_api_key_file", None,
                                f"a key file (or vllm_api_key_command): vllm_host "
                                f"{values['vllm_host']} serves beyond loopback; or "
                                "vllm_accept_open_endpoint = True for an endpoint meant to be "
                                "open"))
    wheelhouse, found = (None, []) if "vllm_runtime" in bad else _wheelhouse(name, values)
    problems += found
    tls, found = read_tls(name, values) if not set(TLS_KEYS) & bad else (None, [])
    problems += found
    if tls is not None:
        problems += _tls_problems(name, host.data, values, tls)
    if {"vllm_runtime", "vllm_image", "vllm_image_tarball"} & bad:
        tarball, archive = None, None
    else:
        tarball, archive, found = _image_archive(name, values)
        problems += found
    if problems:
        raise DataError(problems)
    return _derive(host.name, values, api_key, wheelhouse, tarball, archive, tls,
                   client_address(name, host.data) if tls else None)


def client_address(name: str, data) -> str:
    """The address the controller reaches a host by: its ssh_hostname, else its name;
    loopback for @local."""
    if name.startswith("@local"):
        return "127.0.0.1"
    return address_of(name, data_keys.as_dict(data))


def _tls_problems(name: str, data, values: dict, tls: Tls) -> list[Problem]:
    """What TLS needs beyond good files: a certificate that names the address the
    controller's checks reach the host by (on the kubernetes runtime the node's, where the
    NodePort answers: one Deployment serves every node, so its certificate names them all)."""
    address = client_address(name, data)
    if address in tls.names:
        return []
    return [problem(name, "vllm_tls_cert_file", values["vllm_tls_cert_file"],
                    f"a certificate naming {address}, the address the controller reaches "
                    f"this host by (it names {', '.join(tls.names)})")]


def _derive(name: str, values: dict, api_key: str | None, wheelhouse: str | None,
            tarball: str | None, archive: dict | None, tls: Tls | None = None,
            tls_name: str | None = None) -> Settings:
    profile = _profile(values)
    weights_dir = values["weights_dir"].rstrip("/")
    model_dir = f"{weights_dir}/{profile.local_name}"
    draft_dir = (f"{weights_dir}/{profile.draft_local_name}"
                 if values["model_speculative"] and profile.draft_local_name else None)
    tp = values["vllm_tensor_parallel_size"] or profile.tensor_parallel_size
    memory = values["vllm_gpu_memory_utilization"]
    memory = memory if memory is not None else profile.gpu_memory_utilization
    # The same command with the weights seen elsewhere (a pod's mounts): every other input equal.
    serve_args_at = functools.partial(
        vllm_serve_args, profile, host=values["vllm_host"], port=values["vllm_port"],
        tensor_parallel_size=tp, gpu_memory_utilization=memory,
        num_speculative_tokens=values["model_num_speculative_tokens"],
        shutdown_timeout_s=values["vllm_shutdown_timeout_s"],
        tls_flags=serve_flags(values["vllm_runtime"]) if tls else (),
        extra_args=values["vllm_extra_args"])
    env = {**profile.environment, **values["vllm_environment"]}
    if values["vllm_cpu_threads_bind"] is not None:
        env["VLLM_CPU_OMP_THREADS_BIND"] = values["vllm_cpu_threads_bind"]
    source = values["model_source_dir"] and controller_path(values["model_source_dir"])
    health_timeout = values["vllm_health_timeout_s"]
    if health_timeout is None:
        # Loading is the long part of a start: weights at the data key's rate, plus a fixed
        # allowance for engine start-up (CUDA graphs, KV cache) that does not scale with size.
        health_timeout = int(120 + profile.size_bytes / values["vllm_load_bytes_per_s"])
    return Settings(
        host_name=name, profile=profile,
        model_revision=values["model_revision"] or profile.revision,
        speculative=values["model_speculative"], draft_repo=values["model_draft_repo"],
        weights_dir=values["weights_dir"], model_dir=model_dir, draft_dir=draft_dir,
        model_source_dir=source, runtime=values["vllm_runtime"],
        listen_host=values["vllm_host"], port=values["vllm_port"], api_key=api_key,
        health_timeout_s=health_timeout, shutdown_timeout_s=values["vllm_shutdown_timeout_s"],
        venv_dir=values["vllm_venv_dir"],
        wheelhouse_dir=wheelhouse, environment=env,
        serve_args=serve_args_at(model_path=model_dir, draft_path=draft_dir),
        packages=list(values["host_packages"]), tensor_parallel_size=tp,
        gpu_memory_utilization=memory,
        weights_bytes=(sum(p.stat().st_size for p in Path(source).rglob("*") if p.is_file())
                       if source else profile.size_bytes),
        accept_low_gpu_memory=values["preflight_accept_low_gpu_memory"],
        driver_min_branch=values["nvidia_driver_min_branch"],
        driver_install=values["nvidia_driver_install"],
        wheelhouse_platform=wheelhouse_platform(wheelhouse),
        images=dict(values["vllm_image"] or {}), image_tarball=tarball,
        image_archive=archive, container_gpus=values["vllm_container_gpus"],
        serve_args_at=serve_args_at, tls=tls, tls_name=tls_name)
