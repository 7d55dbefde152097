"""The docker runtime: the pinned vLLM image on the host, and the `docker run` that
vllm.service runs (templates/vllm-container.service.j2, installed by tasks/vllm_service.py).

The container sees the weights at the same paths as the host, mounted read-only, so its
`vllm serve` arguments are `Settings.serve_args` unchanged: the one renderer, every runtime.
"""

from __future__ import annotations

from pyinfra import host
from pyinfra.api import deploy
from pyinfra.api.operation import OperationMeta

from tasks.data_keys import IMAGE_ARCH, DataError, problem
from tasks.facts import CpuArchitecture, DockerImage
from tasks.operations import docker_image_present
from tasks.settings import ENV_FILE, Settings, read_settings
from tasks.tls import TLS_DIR

DOCKER = "/usr/bin/docker"
CONTAINER_NAME = "vllm"
# Host folders the server writes (compile caches, HOME): kept across container restarts, so
# a restart does not compile again. The unit's StateDirectory= and CacheDirectory= create them.
WRITABLE_DIRS = ("/var/lib/vllm", "/var/cache/vllm")
# vLLM needs no capability (the NVIDIA runtime's hook hands the GPUs over from outside the
# container), and nothing in it may gain privileges through a setuid file.
CONFINED = ("--cap-drop", "ALL", "--security-opt", "no-new-privileges")
GPU_ARGS = {
    "gpus": ["--runtime", "nvidia", "--gpus", "all"],
    "cdi": ["--device", "nvidia.com/gpu=all"],
    "none": [],
}


def image_reference(settings: Settings, arch: str) -> str:
    """The image a host of CPU ``arch`` runs; DataError when the data names none (the
    preflight reports the same before any change)."""
    reference = settings.image_for(arch)
    if reference is None:
        raise DataError([problem(settings.host_name, "vllm_image", settings.images,
                                 f"an image for this host's {arch} CPU")])
    return reference


def container_argv(settings: Settings, image: str, environment: dict[str, str],
                   stop_timeout_s: int) -> list[str]:
    """`docker run` for vllm.service: attached (its output is the unit's journal), removed on
    exit, never pulled, GPUs as the data says, host IPC (tensor-parallel workers share memory
    through /dev/shm), the port published on vllm_host, secrets from the 0600 env file, and
    the weights read-only at their host paths; no capabilities, no privilege gained by exec.

    + image: the pinned reference `image_reference` gives
    + environment: non-secret variables, passed by name and value (secrets stay in ENV_FILE)
    + stop_timeout_s: what `docker stop` grants vLLM to drain before SIGKILL
    """
    argv = [DOCKER, "run", "--rm", "--name", CONTAINER_NAME, "--pull", "never",
            *GPU_ARGS[settings.container_gpus], "--ipc", "host", *CONFINED,
            "--publish", f"{settings.listen_host}:{settings.port}:{settings.port}",
            "--stop-timeout", str(stop_timeout_s), "--env-file", ENV_FILE]
    for name, value in sorted(environment.items()):
        argv += ["--env", f"{name}={value}"]
    for folder in (settings.model_dir, settings.draft_dir):
        if folder is not None:
            argv += ["--volume", f"{folder}:{folder}:ro"]
    for folder in WRITABLE_DIRS:
        argv += ["--volume", f"{folder}:{folder}"]
    if settings.tls is not None:
        argv += ["--volume", f"{TLS_DIR}:{TLS_DIR}:ro"]  # root-only files: root reads them
    return argv + ["--entrypoint", "vllm", image, *settings.serve_args]


def facts_read(reference: str) -> list[tuple[type, dict]]:
    """The facts install()'s operation reads on a host whose CPU's image is ``reference``
    (to be asked together: tasks/facts_together.py; the preflight asks them)."""
    return [(CpuArchitecture, {}), (DockerImage, {"reference": reference})]


@deploy("vLLM container image")
def install() -> OperationMeta:
    """Make the host's image for vllm_image present before vllm.service needs it: pulled, or
    for air-gapped sites pushed from vllm_image_tarball and `docker load`-ed; an image of the
    wrong CPU architecture is refused. Returns the operation, a restart trigger.

    Data keys: vllm_image, vllm_image_tarball.
    """
    settings = read_settings(host)
    arch = host.get_fact(CpuArchitecture)
    reference = image_reference(settings, arch)
    archive = settings.image_archive
    source = "loaded from vllm_image_tarball" if archive else "pulled"
    return docker_image_present(
        name=f"Image {reference} present ({source})", reference=reference,
        architecture=IMAGE_ARCH.get(arch, arch), archive=settings.image_tarball,
        image_id=archive["image_id"] if archive else None)
