"""Host data -> one validated, derived view (`Settings`) that every task reads.

Defaults live in group_data/all.py (each key commented there); this module checks types and
ranges and derives paths and the rendered `vllm serve` command. A bad value raises `DataError`
naming the host, the key, what was found and what is needed, before any operation runs.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pyinfra.api.exceptions import PyinfraError

from tasks.models import PROFILES, ModelProfile, vllm_serve_args

REPO = Path(__file__).resolve().parent.parent
RUNTIMES = ("docker", "kubernetes", "venv")
ENV_FILE = "/etc/vllm/vllm.env"
UNIT_NAME = "vllm.service"
# Offline by design, for every runtime (the systemd units, the pod) and the bench client: the
# weights are placed by the deploy, and nothing phones home.
OFFLINE_ENVIRONMENT = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
}
# How the docker runtime hands GPUs to the container: the NVIDIA runtime with --gpus (what
# vLLM's docs show), CDI device names (tasks/nvidia.py writes the spec), or none (CPU builds).
CONTAINER_GPU_MODES = ("gpus", "cdi", "none")
# `uname -m` -> the architecture name images carry (OCI / Docker).
IMAGE_ARCH = {"x86_64": "amd64", "aarch64": "arm64"}
# name[:port]/path:tag, optionally @sha256:<64 hex>: a tag is required (pinned), "latest" is not.
_IMAGE_REF = re.compile(r"^(?P<name>[a-z0-9]+(?:[._/-][a-z0-9]+)*(?::[0-9]+)?(?:/[a-z0-9]+"
                        r"(?:[._-][a-z0-9]+)*)*):(?P<tag>[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})"
                        r"(?:@sha256:[0-9a-f]{64})?$")


# A Hub repository id: owner/name, each part of letters, digits, -, _ and . (not leading).
HUB_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
# What a numeric key needs, shared by its type check and its range check.
HEALTH_TIMEOUT_NEED = "seconds, 10..86400 (a day)"
LOAD_RATE_NEED = "bytes per second, 1e6..1e12 (1 MB/s..1 TB/s)"
MIN_FREE_NEED = "bytes, 0..1e15 (1 PB)"
ALLREDUCE_BYTES_NEED = "bytes, 2**20..2**35 (1 MiB..32 GiB per GPU)"
BUSBW_NEED = "a mapping of GPU model (as nvidia-smi names it) to GB/s, each in (0, 10000]"


class DataError(PyinfraError):
    """Host data that cannot work; the message holds one line per problem."""


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

    @property
    def health_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/health"

    def image_for(self, arch: str) -> str | None:
        """The image a host of CPU `arch` (`uname -m`) runs; None when the data names none."""
        return self.images.get(arch)


def _resolve_path(value: str) -> str:
    """Controller paths in data are relative to the repository, not to the caller's cwd."""
    return str(value if os.path.isabs(value) else REPO / value)


class _Reader:
    """Reads data keys, collecting every problem instead of stopping at the first."""

    def __init__(self, host_name: str, data):
        self.host_name = host_name
        self.data = data
        self.errors: list[str] = []

    def error(self, key: str, found, need: str) -> None:
        self.errors.append(f"{self.host_name}: {key} = {found!r}: {need}")

    def get(self, key: str, types: tuple[type, ...], need: str, optional: bool = False):
        value = self.data.get(key)
        if value is None and optional:
            return None
        # bool is an int subclass: a True port or TP size is a typo, not a number.
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            self.error(key, value, need)
            return None
        return value


def wheelhouse_platform(wheelhouse: str | None) -> dict[str, str]:
    """The `arch=` and `python=` tools/wheelhouse and tools/hf-wheelhouse write in their lock's
    first line ({} without a wheelhouse or such words): the hosts it can install on."""
    if not wheelhouse:
        return {}
    header = (Path(wheelhouse) / "requirements.lock").read_text().split("\n", 1)[0]
    values = dict(word.split("=", 1) for word in header.split() if "=" in word)
    return {key: values[key] for key in ("arch", "python") if key in values}


@functools.lru_cache(maxsize=8)
def _archive_info(path: str, size: int, mtime_ns: int) -> dict:
    with tarfile.open(path) as archive:
        # tools/vllm-image writes manifest.json first, docker save last: stop once it is read.
        member = next((m for m in archive if m.name.removeprefix("./") == "manifest.json"), None)
        if member is None:
            raise ValueError("no manifest.json (not a `docker save` archive)")
        manifest = json.load(archive.extractfile(member))
        if not isinstance(manifest, list) or len(manifest) != 1:
            raise ValueError("manifest.json must describe exactly one image")
        # <id>.json (docker save before 25, tools/vllm-image) or blobs/sha256/<id> (OCI layout).
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


def _number(value, low: float, high: float, integer: bool = False) -> bool:
    """A number (not a bool: True is a typo) in [low, high]."""
    kinds = (int,) if integer else (int, float)
    return isinstance(value, kinds) and not isinstance(value, bool) and low <= value <= high


def _check_infra_keys(read: _Reader) -> None:
    """The keys only the infra checks (tests/infra) read: out of range, a check built on them
    would pass whatever the host (a negative free-space floor, a zero bandwidth floor)."""
    min_free = read.data.get("weights_min_free_bytes")
    if not _number(min_free, 0, 10**15):
        read.error("weights_min_free_bytes", min_free, MIN_FREE_NEED)
    floors = read.data.get("nvidia_allreduce_min_busbw_gbps")
    if not isinstance(floors, dict) or not all(
            isinstance(model, str) and model and _number(gbps, 0, 10000) and gbps > 0
            for model, gbps in floors.items()):
        read.error("nvidia_allreduce_min_busbw_gbps", floors, BUSBW_NEED)
    size = read.data.get("nvidia_allreduce_bytes")
    if not _number(size, 2**20, 2**35, integer=True):
        read.error("nvidia_allreduce_bytes", size, ALLREDUCE_BYTES_NEED)
    model = read.data.get("nvidia_gpu_model")
    if model is not None and not (isinstance(model, str) and model.strip()):
        read.error("nvidia_gpu_model", model, "None (any GPU model) or the name nvidia-smi "
                   "reports, e.g. NVIDIA GB200")


def resolve(host) -> Settings:
    """Validate a host's data and derive everything the tasks need."""
    read = _Reader(host.name, host.data)
    profile_name = read.get("model_profile", (str,), f"one of {sorted(PROFILES)}")
    profile = PROFILES.get(profile_name) if profile_name else None
    if profile_name and not profile:
        read.error("model_profile", profile_name, f"one of {sorted(PROFILES)} (tasks/models.py)")
    revision = read.get("model_revision", (str,), "a commit SHA or tag", optional=True)
    speculative = read.get("model_speculative", (bool,), "true or false")
    draft_repo = read.get("model_draft_repo", (str,), "a Hub repo id like owner/name")
    if draft_repo is not None and not HUB_REPO_ID.match(draft_repo):
        read.error("model_draft_repo", draft_repo, "a Hub repo id like owner/name")
    num_spec = read.get("model_num_speculative_tokens", (int,), "an integer 1..10", optional=True)
    if num_spec is not None and not 1 <= num_spec <= 10:
        read.error("model_num_speculative_tokens", num_spec, "an integer 1..10")
    source = read.get("model_source_dir", (str,), "a directory on the controller", optional=True)
    if source is not None:
        source = _resolve_path(source)
        if not (Path(source) / "config.json").is_file():
            read.error("model_source_dir", source,
                       "a model folder with config.json on the controller (tools/make-tiny-model)")
    weights_dir = read.get("weights_dir", (str,), "an absolute path on the host")
    if weights_dir and not weights_dir.startswith("/"):
        read.error("weights_dir", weights_dir, "an absolute path on the host")

    runtime = read.get("vllm_runtime", (str,), f"one of {list(RUNTIMES)}")
    if runtime and runtime not in RUNTIMES:
        read.error("vllm_runtime", runtime, f"one of {list(RUNTIMES)}")
    listen_host = read.get("vllm_host", (str,), "an address to listen on, e.g. 0.0.0.0")
    port = read.get("vllm_port", (int,), "a TCP port 1..65535")
    if port is not None and not 1 <= port <= 65535:
        read.error("vllm_port", port, "a TCP port 1..65535")
    tp = read.get("vllm_tensor_parallel_size", (int,), "a positive integer", optional=True)
    if tp is not None and tp < 1:
        read.error("vllm_tensor_parallel_size", tp, "a positive integer")
    memory = read.get("vllm_gpu_memory_utilization", (int, float), "a fraction in (0, 1]",
                      optional=True)
    if memory is not None and not 0 < memory <= 1:
        read.error("vllm_gpu_memory_utilization", memory, "a fraction in (0, 1]")
    extra_args = read.get("vllm_extra_args", (list, tuple), "a list of strings")
    if extra_args and not all(isinstance(arg, str) for arg in extra_args):
        read.error("vllm_extra_args", extra_args, "a list of strings")
    environment = read.get("vllm_environment", (dict,), "a mapping of NAME: value strings")
    if environment and not all(isinstance(k, str) and isinstance(v, str)
                               for k, v in environment.items()):
        read.error("vllm_environment", environment, "a mapping of NAME: value strings")
    threads_bind = read.get("vllm_cpu_threads_bind", (str,), "a CPU list like 0-3",
                            optional=True)
    key_file = read.get("vllm_api_key_file", (str,), "a file on the controller", optional=True)
    api_key = None
    if key_file is not None:
        key_path = Path(os.path.expanduser(_resolve_path(key_file)))
        api_key = key_path.read_text().strip() if key_path.is_file() else ""
        if not api_key:
            read.error("vllm_api_key_file", key_file, "a readable, non-empty file on the controller")
    health_timeout = read.get("vllm_health_timeout_s", (int,), HEALTH_TIMEOUT_NEED,
                              optional=True)
    if health_timeout is not None and not 10 <= health_timeout <= 86400:
        read.error("vllm_health_timeout_s", health_timeout, HEALTH_TIMEOUT_NEED)
    load_rate = read.get("vllm_load_bytes_per_s", (int, float), LOAD_RATE_NEED)
    if load_rate is not None and not 1e6 <= load_rate <= 1e12:
        read.error("vllm_load_bytes_per_s", load_rate, LOAD_RATE_NEED)
    venv_dir = read.get("vllm_venv_dir", (str,), "an absolute path on the host")
    wheelhouse = read.get("vllm_wheelhouse_dir", (str,), "a folder made by tools/wheelhouse",
                          optional=True)
    if runtime == "venv":
        if wheelhouse is None:
            read.error("vllm_wheelhouse_dir", None,
                       "the venv runtime needs a wheelhouse folder (tools/wheelhouse)")
        else:
            wheelhouse = _resolve_path(wheelhouse)
            if not (Path(wheelhouse) / "requirements.lock").is_file():
                read.error("vllm_wheelhouse_dir", wheelhouse,
                           "a folder with requirements.lock: run tools/wheelhouse")
    else:
        wheelhouse = None  # only the venv runtime installs from it
    images = read.get("vllm_image", (dict,), "a mapping of CPU architecture (uname -m) to a "
                      "pinned image reference", optional=runtime != "docker") or {}
    for arch, reference in images.items():
        pinned = _IMAGE_REF.match(reference) if isinstance(reference, str) else None
        if arch not in IMAGE_ARCH:
            read.error("vllm_image", images, f"CPU architectures from {sorted(IMAGE_ARCH)} "
                       f"as keys (found {arch!r})")
        elif not pinned:
            read.error("vllm_image", reference, f"{arch}: an image pinned by tag, e.g. "
                       "vllm/vllm-openai:v0.19.1-cu130[@sha256:<64 hex>]")
        elif pinned["tag"] == "latest":
            read.error("vllm_image", reference, f"{arch}: a pinned tag, not latest (it moves)")
    tarball = read.get("vllm_image_tarball", (str,), "a `docker save` archive on the "
                       "controller", optional=True)
    archive = None
    if tarball is not None and runtime == "docker":
        tarball = _resolve_path(tarball)
        try:
            archive = image_archive_info(tarball)
        except (OSError, ValueError) as error:
            read.error("vllm_image_tarball", tarball, f"a readable `docker save` archive "
                       f"({error})")
        else:
            unknown = sorted(ref for ref in images.values() if ref not in archive["tags"])
            if unknown:
                read.error("vllm_image", unknown, f"the tags vllm_image_tarball holds: "
                           f"{archive['tags']} (the unit runs the image by that name)")
    gpu_mode = read.get("vllm_container_gpus", (str,), f"one of {list(CONTAINER_GPU_MODES)}")
    if gpu_mode is not None and gpu_mode not in CONTAINER_GPU_MODES:
        read.error("vllm_container_gpus", gpu_mode, f"one of {list(CONTAINER_GPU_MODES)}")
    packages = read.get("host_packages", (list, tuple), "a list of package names")
    accept_low = read.get("preflight_accept_low_gpu_memory", (bool,), "true or false")
    driver_install = read.get("nvidia_driver_install", (bool,), "true or false")
    driver_branch = read.get("nvidia_driver_min_branch", (int,), "a driver branch like 580")
    if driver_branch is not None and not 400 <= driver_branch <= 9999:
        read.error("nvidia_driver_min_branch", driver_branch, "a driver branch like 580")

    _check_infra_keys(read)

    if profile is not None and tp is not None and tp >= 1 and profile.attention_heads % tp:
        read.error("vllm_tensor_parallel_size", tp,
                   f"a divisor of the {profile.attention_heads} attention heads of "
                   f"{profile.name} (vLLM shards heads evenly)")

    if read.errors:
        raise DataError("invalid host data:\n  " + "\n  ".join(read.errors))

    model_dir = f"{weights_dir.rstrip('/')}/{profile.local_name}"
    draft_dir = (f"{weights_dir.rstrip('/')}/{profile.draft_local_name}"
                 if speculative and profile.draft_local_name else None)
    tp = tp if tp is not None else profile.tensor_parallel_size
    memory = memory if memory is not None else profile.gpu_memory_utilization
    serve_args = vllm_serve_args(
        profile, model_path=model_dir, draft_path=draft_dir, host=listen_host, port=port,
        tensor_parallel_size=tp, gpu_memory_utilization=memory,
        num_speculative_tokens=num_spec, extra_args=extra_args)
    # The same command with the weights seen elsewhere (a pod's mounts): every other input equal.
    serve_args_at = functools.partial(
        vllm_serve_args, profile, host=listen_host, port=port, tensor_parallel_size=tp,
        gpu_memory_utilization=memory, num_speculative_tokens=num_spec, extra_args=extra_args)
    env = {**profile.environment, **environment}
    if threads_bind is not None:
        env["VLLM_CPU_OMP_THREADS_BIND"] = threads_bind
    if health_timeout is None:
        # Loading is the long part of a start: weights at the data key's rate, plus a fixed
        # allowance for engine start-up (CUDA graphs, KV cache) that does not scale with size.
        health_timeout = int(120 + profile.size_bytes / load_rate)
    return Settings(
        host_name=host.name, profile=profile, model_revision=revision or profile.revision,
        speculative=speculative, draft_repo=draft_repo, weights_dir=weights_dir,
        model_dir=model_dir, draft_dir=draft_dir, model_source_dir=source, runtime=runtime,
        listen_host=listen_host, port=port, api_key=api_key, health_timeout_s=health_timeout,
        venv_dir=venv_dir, wheelhouse_dir=wheelhouse, environment=env, serve_args=serve_args,
        packages=list(packages), tensor_parallel_size=tp, gpu_memory_utilization=memory,
        weights_bytes=(sum(p.stat().st_size for p in Path(source).rglob("*") if p.is_file())
                       if source else profile.size_bytes),
        accept_low_gpu_memory=accept_low, driver_min_branch=driver_branch,
        driver_install=driver_install, wheelhouse_platform=wheelhouse_platform(wheelhouse),
        images=dict(images), image_tarball=tarball if archive else None,
        image_archive=archive, container_gpus=gpu_mode,
        serve_args_at=serve_args_at)
