"""The seed's Kubernetes objects (section 4.1), rendered from the project's state.

Pure: no host, no cluster. `render_manifests` turns one `ManifestValues` into one YAML
text per object (templates/k8s/*.yaml.j2, one object per file), in the order they are
applied. The container's argv is `tasks.models.vllm_serve_args` output, passed in unchanged,
so a flag can never differ between the venv unit, a container unit and the Deployment.
All decisions (names, probe windows, volumes, which keys a Secret holds, which nodes the pod
may run on) are made here; the templates only place explicit values. The pod runs offline with
the systemd units' list (tasks.settings.OFFLINE_ENVIRONMENT), and the Hub token never reaches
the cluster: the pod reads weights the deploy placed and downloads nothing.
tests/unit/test_k8s_manifests.py validates every object against the Kubernetes 1.34 and 1.35
schemas and lines it up against the seed.
"""

from __future__ import annotations

import base64
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import jinja2

from tasks.data_keys import (DNS_LABEL_RFC1035, DNS_LABEL_RFC1123, NODE_NAME, SERVICE_TYPES,
                             VOLUME_TYPES, is_integer)
from tasks.settings import OFFLINE_ENVIRONMENT, STOP_MARGIN_S
from tasks.tls import CA_FILE, CERT_FILE, KEY_FILE, TLS_DIR, Tls, serve_flags

TEMPLATE_DIR = Path(__file__).resolve().parent.parent / "templates" / "k8s"
# Apply order: the claim template and the Secret exist before the pod that names them.
MANIFESTS = ("resourceclaimtemplate.yaml", "secret.yaml", "deployment.yaml", "service.yaml")

# Where the container sees the weights: pass these to vllm_serve_args as model_path and
# draft_path (the seed's paths).
MODEL_MOUNT = "/app/model"
DRAFT_MOUNT = "/app/eagle-model"
CONTAINER_NAME = "vllm-server"
GPU_CLAIM = "gpu"
# vLLM reads VLLM_API_KEY as --api-key's default, so the key never sits in the argv.
SECRET_KEYS = ("VLLM_API_KEY",)
# vLLM's TLS files, under these keys in the same Secret, mounted read-only at TLS_DIR
# (where tls.serve_flags("kubernetes") points vLLM), 0400: the container runs as root with
# every capability dropped, so the owner's read bit is what lets it open them.
TLS_SECRET_KEYS = (CERT_FILE, KEY_FILE, CA_FILE)
TLS_VOLUME = "vllm-tls"
TLS_FILE_MODE = 0o400
# Names the Hub token goes by (huggingface_hub reads both): refused in the pod's environment,
# for the token stays off the cluster.
HUB_TOKEN_NAMES = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")
# The node label the pod's affinity matches, set by the kubelet on every node.
HOSTNAME_LABEL = "kubernetes.io/hostname"

PROBE_PERIOD_S = 10
# Start-up work that does not scale with the checkpoint: CUDA init, torch.compile, CUDA graph
# capture, KV cache allocation.
STARTUP_FIXED_S = 600
# A failed startup probe kills the container and the next start loads every byte again, so
# the window errs long: twice the estimated load time. A healthy server passes at its first
# good answer, so the slack costs nothing when the estimate is right.
STARTUP_LOAD_FACTOR = 2
# What a rollout may take beyond the startup window before Kubernetes calls it stalled:
# scheduling, the GPU claim's allocation and pulling a ~20 GB image. Kubernetes' default
# deadline (600 s) would declare a Kimi rollout failed while it is still loading.
ROLLOUT_EXTRA_S = 900

_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]*$")
# Kubernetes' integer fields (progressDeadlineSeconds, failureThreshold) are int32.
_INT32_MAX = 2**31 - 1


def startup_probe_window_s(size_bytes: int, load_bytes_per_s: float) -> int:
    """Seconds the startup probe lets vLLM take before Kubernetes kills it: a fixed allowance
    plus `STARTUP_LOAD_FACTOR` times the time to load `size_bytes` at `load_bytes_per_s`,
    rounded up to whole probe periods. Kimi-K2.6 (595 GB) at 1 GB/s: 1790 s.

    + size_bytes: checkpoint bytes read at start (model plus draft)
    + load_bytes_per_s: how fast a node moves weights from disk into GPU memory (data key
      `vllm_load_bytes_per_s`)
    """
    if size_bytes < 0 or load_bytes_per_s <= 0:
        raise ValueError(f"need size_bytes >= 0 and load_bytes_per_s > 0, "
                         f"got {size_bytes!r} and {load_bytes_per_s!r}")
    window = STARTUP_FIXED_S + STARTUP_LOAD_FACTOR * size_bytes / load_bytes_per_s
    return math.ceil(window / PROBE_PERIOD_S) * PROBE_PERIOD_S


def rollout_deadline_s(size_bytes: int, load_bytes_per_s: float) -> int:
    """The Deployment's progressDeadlineSeconds: the startup window plus ROLLOUT_EXTRA_S. The
    deploy's `kubectl rollout status --timeout` waits as long."""
    return startup_probe_window_s(size_bytes, load_bytes_per_s) + ROLLOUT_EXTRA_S


def termination_grace_s(serve_args) -> int | None:
    """The pod's terminationGracePeriodSeconds: vLLM's --shutdown-timeout plus the exit
    margin the systemd units allow; None (Kubernetes' default) when the argv sets none."""
    shutdown = _flag_value(tuple(serve_args), "--shutdown-timeout")
    return None if shutdown is None else int(shutdown) + STOP_MARGIN_S


def _flag_value(argv: tuple[str, ...], *names: str) -> str | None:
    """The value the last occurrence of a flag gives, as argparse reads it (`--f v`, `--f=v`)."""
    value = None
    for index, arg in enumerate(argv):
        for name in names:
            if arg == name and index + 1 < len(argv):
                value = argv[index + 1]
            elif arg.startswith(name + "="):
                value = arg[len(name) + 1:]
    return value


def _json_field(text: str, key: str) -> object:
    try:
        return json.loads(text).get(key)
    except (ValueError, AttributeError):
        return None


class ManifestValuesError(ValueError):
    """Values the objects cannot hold: `problems` lists them, one line each in the message."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("invalid Kubernetes manifest values:\n  " + "\n  ".join(problems))


@dataclass(frozen=True)
class ManifestValues:
    """Everything the four objects are rendered from; defaults are the seed's values.

    + serve_args: `vllm_serve_args(profile, model_path=MODEL_MOUNT, draft_path=DRAFT_MOUNT or
      None, ...)`, without the `vllm` executable; the GPU count and container port are read
      from it, so they cannot disagree with the command
    + model_volume: hostPath: the node's model folder; persistentVolumeClaim: the claim name
    + checkpoint_size_bytes: model (plus draft) bytes, which size the startup probe
    + draft_volume: as model_volume, for the EAGLE-3 draft; None when speculative decoding is
      off, and then serve_args must not name a draft
    + volume_type: "hostPath" (the seed: weights already on the node, type Directory) or
      "persistentVolumeClaim"
    + model_sub_path, draft_sub_path: persistentVolumeClaim only: the folder inside the claim
      (one claim holding a folder per model, as `weights_dir` does on hosts)
    + load_bytes_per_s: disk to GPU load rate (data key `vllm_load_bytes_per_s`)
    + name: Deployment, Service and `app` label; the claim template is NAME-gpu-claim
    + namespace: where all four objects live
    + image, image_digest: the pinned tag; a "sha256:..." digest pins it as image@digest
    + device_class: the DRA DeviceClass of the GPU driver
    + cpu_request, cpu_limit, memory_request, memory_limit: the container's quantities
    + shm_size: size limit of the memory-backed /dev/shm (counts against memory_limit)
    + node_selector: extra node labels, on top of kubernetes.io/arch: arm64
    + node_names: the nodes the pod may run on (their HOSTNAME_LABEL), by required node
      affinity: the nodes whose weights_dir holds the weights. Required with hostPath volumes,
      which exist only there; order does not matter
    + environment: container environment on top of OFFLINE_ENVIRONMENT (a name given here
      wins, as in the systemd units); secret names are refused here
    + secret_name: the Secret holding SECRET_KEYS; None gives NAME-secrets
    + service_type: "NodePort" (the seed) or "ClusterIP"
    + service_port, node_port: the Service's port; node_port for NodePort only
    + api_key: the Secret's value, read by the caller from a controller file at apply time;
      None leaves the key out of the Secret (the pod then runs without it, the endpoint open)
    + tls: vLLM's own TLS (tasks/tls.py), None for plain HTTP: its certificate, key and CA go
      into the Secret, mounted read-only at TLS_DIR; the probes ask over HTTPS; serve_args
      must then carry tls.serve_flags("kubernetes"), and only then
    """

    serve_args: tuple[str, ...]
    model_volume: str
    checkpoint_size_bytes: int
    draft_volume: str | None = None
    volume_type: str = "hostPath"
    model_sub_path: str | None = None
    draft_sub_path: str | None = None
    load_bytes_per_s: float = 1.0e9
    name: str = "kimi-k26"
    namespace: str = "default"
    image: str = "vllm/vllm-openai:v0.19.1-cu130"
    image_digest: str | None = None
    device_class: str = "gpu.nvidia.com"
    cpu_request: str = "16"
    cpu_limit: str = "32"
    memory_request: str = "128Gi"
    memory_limit: str = "256Gi"
    shm_size: str = "16Gi"
    node_selector: Mapping[str, str] = field(default_factory=dict)
    node_names: tuple[str, ...] = ()
    environment: Mapping[str, str] = field(default_factory=dict)
    secret_name: str | None = None
    service_type: str = "NodePort"
    service_port: int = 8000
    node_port: int = 30180
    api_key: str | None = field(default=None, repr=False)
    tls: Tls | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        # Lists from callers become tuples: the values stay what they were when checked.
        object.__setattr__(self, "serve_args", tuple(self.serve_args))
        # Sorted: the same nodes listed in another order are the same objects (no rollout).
        object.__setattr__(self, "node_names", tuple(sorted(self.node_names, key=str)))
        problems = [*_name_problems(self), *_placement_problems(self),
                    *_environment_problems(self), *_argv_problems(self),
                    *_number_problems(self)]
        if problems:
            raise ManifestValuesError(problems)

    @property
    def gpu_count(self) -> int:
        """GPUs the claim asks for: the tensor-parallel size the command runs with."""
        return int(_flag_value(self.serve_args, "--tensor-parallel-size"))

    @property
    def container_port(self) -> int:
        """The port vLLM listens on inside the pod: the command's --port."""
        return int(_flag_value(self.serve_args, "--port"))

    @property
    def claim_template_name(self) -> str:
        return f"{self.name}-gpu-claim"

    @property
    def secret_object_name(self) -> str:
        """The Secret's name: secret_name, or NAME-secrets."""
        return self.secret_name or f"{self.name}-secrets"

    @property
    def image_reference(self) -> str:
        return f"{self.image}@{self.image_digest}" if self.image_digest else self.image


def _name_problems(values: ManifestValues) -> list[str]:
    problems = []
    # A Service's name must be an RFC 1035 label; a namespace's an RFC 1123 one.
    if not DNS_LABEL_RFC1035.match(values.name):
        problems.append(f"name={values.name!r}: an RFC 1035 label (a-z, 0-9, -)")
    if not DNS_LABEL_RFC1123.match(values.namespace):
        problems.append(f"namespace={values.namespace!r}: an RFC 1123 label (a-z, 0-9, -)")
    if values.secret_name is not None and not DNS_LABEL_RFC1035.match(values.secret_name):
        problems.append(f"secret_name={values.secret_name!r}: an RFC 1035 label")
    if values.image_digest is not None and not _DIGEST.match(values.image_digest):
        problems.append(f"image_digest={values.image_digest!r}: sha256:<64 hex digits>")
    return problems


def _placement_problems(values: ManifestValues) -> list[str]:
    """Volumes, the nodes that hold them and the Service's ports."""
    problems = []
    if values.volume_type not in VOLUME_TYPES:
        problems.append(f"volume_type={values.volume_type!r}: one of {VOLUME_TYPES}")
    if values.volume_type == "hostPath" and (values.model_sub_path or values.draft_sub_path):
        problems.append("model_sub_path/draft_sub_path: persistentVolumeClaim only")
    if values.volume_type == "hostPath" and not values.node_names:
        problems.append("node_names=(): the nodes holding the weights (hostPath volumes exist "
                        "only there; any other node leaves the pod failing to start)")
    bad_nodes = [name for name in values.node_names
                 if not isinstance(name, str) or not NODE_NAME.match(name)]
    if bad_nodes:
        problems.append(f"node_names {bad_nodes}: {HOSTNAME_LABEL} values (RFC 1123 "
                        "subdomains of at most 63 characters)")
    if len(set(map(str, values.node_names))) != len(values.node_names):
        problems.append(f"node_names={list(values.node_names)}: each node once")
    if values.service_type not in SERVICE_TYPES:
        problems.append(f"service_type={values.service_type!r}: one of {SERVICE_TYPES}")
    if not is_integer(values.service_port) or not 1 <= values.service_port <= 65535:
        problems.append(f"service_port={values.service_port!r}: a TCP port 1..65535")
    if values.service_type == "NodePort" and not (is_integer(values.node_port)
                                                  and 30000 <= values.node_port <= 32767):
        problems.append(f"node_port={values.node_port!r}: the default NodePort range "
                        "30000-32767")
    return problems


def _environment_problems(values: ManifestValues) -> list[str]:
    problems = []
    clashing = sorted(set(values.environment) & {*SECRET_KEYS, *HUB_TOKEN_NAMES})
    if clashing:
        problems.append(f"environment holds {clashing}: secrets come from the Secret only, "
                        "and the Hub token stays off the cluster")
    bad_names = sorted(key for key in values.environment if not _ENV_NAME.match(key))
    if bad_names:
        problems.append(f"environment names {bad_names}: not valid variable names")
    return problems


def _argv_problems(values: ManifestValues) -> list[str]:
    problems = []
    speculative = _flag_value(values.serve_args, "--speculative-config")
    if (values.draft_volume is None) != (speculative is None):
        problems.append("draft_volume and serve_args disagree: mount a draft exactly when "
                        "--speculative-config is given")
    # Host-path argv (Settings.serve_args) is the likely slip: the pod sees only the mounts.
    if values.serve_args[:2] != ("serve", MODEL_MOUNT):
        problems.append(f"serve_args: vllm_serve_args output with model_path={MODEL_MOUNT!r}")
    if speculative is not None and _json_field(speculative, "model") != DRAFT_MOUNT:
        problems.append(f"serve_args: --speculative-config with model {DRAFT_MOUNT!r} "
                        f"(draft_path={DRAFT_MOUNT!r})")
    for flag, label in (("--tensor-parallel-size", "GPU count"), ("--port", "port")):
        value = _flag_value(values.serve_args, flag)
        if value is None or not value.isdigit() or int(value) < 1:
            problems.append(f"serve_args: {flag} with a positive integer (the {label})")
    port = _flag_value(values.serve_args, "--port")
    if port is not None and port.isdigit() and int(port) > 65535:
        problems.append(f"serve_args: --port {port}: a TCP port 1..65535 (the container port)")
    served_tls = [_flag_value(values.serve_args, flag)
                  for flag in ("--ssl-certfile", "--ssl-keyfile")]
    wanted_tls = serve_flags("kubernetes")[1::2] if values.tls is not None else [None, None]
    if served_tls != wanted_tls:
        problems.append(f"serve_args: --ssl-certfile/--ssl-keyfile {served_tls} where tls "
                        f"wants {wanted_tls} (the files where the pod mounts the Secret, "
                        "exactly when tls is given)")
    shutdown = _flag_value(values.serve_args, "--shutdown-timeout")
    if shutdown is not None and not shutdown.isdigit():
        problems.append(f"serve_args: --shutdown-timeout {shutdown!r}: whole seconds, 0 or more "
                        "(the pod's termination grace is derived from it)")
    return problems


def _number_problems(values: ManifestValues) -> list[str]:
    """The inputs of the probe window and the rollout deadline, and the deadline itself: it
    lands in int32 fields, and a slip of units in the load rate could overflow them."""
    size, rate = values.checkpoint_size_bytes, values.load_bytes_per_s
    problems = []
    if not is_integer(size) or size < 0:
        problems.append(f"checkpoint_size_bytes={size!r}: a byte count >= 0")
    if not isinstance(rate, (int, float)) or isinstance(rate, bool) or not (
            math.isfinite(rate) and rate > 0):
        problems.append(f"load_bytes_per_s={rate!r}: a finite rate > 0 bytes per second "
                        "(vllm_load_bytes_per_s)")
    if problems:
        return problems
    deadline = rollout_deadline_s(size, rate)
    if deadline > _INT32_MAX:
        problems.append(f"load_bytes_per_s={rate!r}: a rate that loads {size} bytes within "
                        f"progressDeadlineSeconds' limit of {_INT32_MAX} s (found {deadline} "
                        "s; vllm_load_bytes_per_s is in bytes per second)")
    return problems



def _labels(values: ManifestValues) -> list[tuple[str, str]]:
    # `app` is the seed's selector and a Deployment's selector cannot change in place, so it
    # stays exactly as the seed has it; managed-by tells kubectl users who owns the object.
    return [("app", values.name), ("app.kubernetes.io/managed-by", "pyinfra")]


def _volumes(values: ManifestValues) -> list[dict]:
    """The weight volumes, the seed's names, in the seed's order."""
    wanted = [("model-storage", MODEL_MOUNT, values.model_volume, values.model_sub_path)]
    if values.draft_volume is not None:
        wanted.append(("eagle-model-storage", DRAFT_MOUNT, values.draft_volume,
                       values.draft_sub_path))
    return [{"name": name, "mount_path": mount, "source": source, "sub_path": sub_path}
            for name, mount, source, sub_path in wanted]


def _probe(path: str, period_s: int, timeout_s: int, failure_threshold: int,
           scheme: str = "HTTP") -> dict:
    """A probe's fields; `scheme` HTTPS for vLLM's TLS (the kubelet does not verify the
    certificate of a probe it sends)."""
    return {"path": path, "period_s": period_s, "timeout_s": timeout_s,
            "failure_threshold": failure_threshold, "scheme": scheme}


def _secret_data(values: ManifestValues) -> list[tuple[str, str]]:
    """The Secret's (key, base64 value) pairs: the API key, vLLM's TLS files.

    `data`, not `stringData`: under server-side apply a key dropped from stringData stays in
    the live Secret, so a removed API key would keep working. From `data`, a key this field
    manager applied before and applies no more is removed (the HF_TOKEN earlier versions put
    there, say): the Secret is rendered even when empty."""
    secrets = list(zip(SECRET_KEYS, (values.api_key,)))
    if values.tls is not None:
        secrets += zip(TLS_SECRET_KEYS, (values.tls.cert, values.tls.key, values.tls.ca))
    return [(key, base64.b64encode(value.encode()).decode())
            for key, value in secrets if value is not None]


def template_context(values: ManifestValues) -> dict[str, dict]:
    """Template file name -> the explicit values it receives. pyinfra's files.template gives
    the same text for the same values, as both use one Jinja setup (no trim_blocks)."""
    labels = _labels(values)
    window_s = startup_probe_window_s(values.checkpoint_size_bytes, values.load_bytes_per_s)
    common = {"name": values.name, "namespace": values.namespace, "labels": labels}
    scheme = "HTTP" if values.tls is None else "HTTPS"
    return {
        "resourceclaimtemplate.yaml.j2": {
            **common, "claim_template_name": values.claim_template_name,
            "request_name": GPU_CLAIM, "device_class": values.device_class,
            "gpu_count": values.gpu_count,
        },
        "secret.yaml.j2": {**common, "secret_name": values.secret_object_name,
                           "data": _secret_data(values)},
        "deployment.yaml.j2": {
            **common,
            "selector_labels": [("app", values.name)],
            "progress_deadline_s": rollout_deadline_s(values.checkpoint_size_bytes,
                                                      values.load_bytes_per_s),
            # The kubelet's SIGKILL after SIGTERM: vLLM's drain (--shutdown-timeout) and exit,
            # as the units allow; Kubernetes' default, 30 s, would cut the drain short.
            "termination_grace_s": termination_grace_s(values.serve_args),
            "container_name": CONTAINER_NAME,
            "image": values.image_reference,
            "command": ["vllm"],
            "args": list(values.serve_args),
            "environment": sorted({**OFFLINE_ENVIRONMENT, **values.environment}.items()),
            "secret_name": values.secret_object_name,
            "secret_keys": list(SECRET_KEYS),
            "claim_name": GPU_CLAIM,
            "claim_template_name": values.claim_template_name,
            "cpu_request": values.cpu_request, "cpu_limit": values.cpu_limit,
            "memory_request": values.memory_request, "memory_limit": values.memory_limit,
            "port": values.container_port,
            "volume_type": values.volume_type,
            "volumes": _volumes(values),
            "tls_volume": None if values.tls is None else {
                "name": TLS_VOLUME, "mount_path": TLS_DIR, "keys": list(TLS_SECRET_KEYS),
                "mode": TLS_FILE_MODE},
            "shm_size": values.shm_size,
            "node_selector": [("kubernetes.io/arch", "arm64"),
                              *sorted(values.node_selector.items())],
            "hostname_label": HOSTNAME_LABEL,
            "node_names": list(values.node_names),
            "startup_probe": _probe("/health", PROBE_PERIOD_S, 5, window_s // PROBE_PERIOD_S,
                                    scheme),
            "readiness_probe": _probe("/health", PROBE_PERIOD_S, 5, 3, scheme),
            # A liveness kill costs a full reload of the weights: only a server that has not
            # answered for two and a half minutes is restarted.
            "liveness_probe": _probe("/health", 30, 10, 5, scheme),
        },
        "service.yaml.j2": {
            **common, "selector_labels": [("app", values.name)],
            "service_type": values.service_type, "port": values.service_port,
            "target_port": values.container_port,
            "node_port": values.node_port if values.service_type == "NodePort" else None,
        },
    }


def _environment() -> jinja2.Environment:
    # pyinfra's own template settings, so files.template and this module render alike.
    return jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATE_DIR)),
                              undefined=jinja2.StrictUndefined, keep_trailing_newline=True)


def render_manifests(values: ManifestValues) -> dict[str, str]:
    """File name -> YAML text of one object, in apply order (MANIFESTS). secret.yaml holds
    the secret values: write it 0600 and keep it out of diffs and logs."""
    environment = _environment()
    contexts = template_context(values)
    return {name: environment.get_template(name + ".j2").render(**contexts[name + ".j2"])
            for name in MANIFESTS}
