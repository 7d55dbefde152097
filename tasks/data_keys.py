"""Every data key the deploy reads, declared once: its default, what a value needs, what it
means and the concern that reads it.

    group_data/all.py      takes its defaults from DEFAULTS
    README.md              its data-keys table is generated from KEYS (data-keys-table)
    check(name, data)      every problem of one host's data, as a list of Problem

A value is checked here against its own key (type, range, choices, shape); rules that tie keys
together or read the controller's files (a wheelhouse's lock, a key file) stay with the concern
that derives from them, and report in the same `Problem` form. A key no declaration knows is a
problem too, with the closest known name: a misspelled key would otherwise be ignored silently
and its default used.
"""

from __future__ import annotations

import difflib
import functools
import json
import re
import shlex
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from pyinfra.api.exceptions import PyinfraError

from tasks.models import PROFILES

# ---- names, one definition each -------------------------------------------------------------
# An RFC 1123 label (a namespace, a node name's part): lower-case letters, digits, '-'.
DNS_LABEL_RFC1123 = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
# An RFC 1035 label (a Service's name must be one): as above, starting with a letter.
DNS_LABEL_RFC1035 = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")
# An RFC 1123 subdomain (most object names: a PersistentVolumeClaim's).
DNS_SUBDOMAIN_RFC1123 = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
_SUBDOMAIN_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
# A node's kubernetes.io/hostname label value: an RFC 1123 subdomain of at most 63 characters.
NODE_NAME = re.compile(rf"^(?=.{{1,63}}$){_SUBDOMAIN_LABEL}(\.{_SUBDOMAIN_LABEL})*$")
# The Deployment, Service and Secret names: an RFC 1035 label short enough that
# NAME-gpu-claim stays one.
K8S_NAME = re.compile(r"^[a-z]([-a-z0-9]{0,51}[a-z0-9])?$")
# A full commit hash: a revision that names the same files forever (a branch or tag can move).
COMMIT = re.compile(r"^[0-9a-f]{40}$")
# Addresses only the host itself reaches.
LOOPBACK = re.compile(r"^(127\.\d+\.\d+\.\d+|::1|localhost)$")
# A Hub repository id: owner/name, each part of letters, digits, -, _ and . (not leading).
HUB_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
# `uname -m` -> the architecture name images carry (OCI / Docker).
IMAGE_ARCH = {"x86_64": "amd64", "aarch64": "arm64"}
# name[:port]/path:tag, optionally @sha256:<64 hex>: a tag is required (pinned).
IMAGE_REFERENCE = re.compile(
    r"^(?P<name>[a-z0-9]+(?:[._/-][a-z0-9]+)*(?::[0-9]+)?(?:/[a-z0-9]+(?:[._-][a-z0-9]+)*)*)"
    r":(?P<tag>[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})(?:@sha256:[0-9a-f]{64})?$")
# Paths that land unquoted in a unit's ExecStart= line: characters systemd and a shell both
# take literally (no spaces, quotes, `%` specifiers or `$` variables).
LITERAL_PATH = re.compile(r"^/[A-Za-z0-9_./@+,:=-]*$")
# Folders a task must never take over (it sets the owner and mode of the folder it is given).
SHARED_FOLDERS = frozenset({"/", "/etc", "/home", "/opt", "/root", "/srv", "/tmp", "/usr",
                            "/usr/local", "/var", "/var/lib", "/var/tmp"})
# Five fields of digits, names and */,-? : a crontab line, which OnCalendar does not read.
CRON_LINE = re.compile(r"^\s*[0-9A-Za-z*/,?-]+(\s+[0-9A-Za-z*/,?-]+){4}\s*$")
CRON_MACRO = re.compile(r"^@(yearly|annually|monthly|weekly|daily|midnight|hourly)$")
# A results folder's name (bench_run_id).
RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
USER_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,31}$")
RUNTIMES = ("docker", "kubernetes", "venv")
# How the docker runtime hands GPUs to the container: the NVIDIA runtime with --gpus (vLLM's
# docs), CDI device names (tasks/nvidia.py writes the spec), or none (CPU builds).
CONTAINER_GPU_MODES = ("gpus", "cdi", "none")
VOLUME_TYPES = ("hostPath", "persistentVolumeClaim")
SERVICE_TYPES = ("NodePort", "ClusterIP")
# The workloads of tasks/bench.py (kept in step by tests/unit/test_data_keys.py).
BENCH_PROFILES = ("sandbox", "seed-8k-1k")


# ---- what a value must be ------------------------------------------------------------------
def boolean(value) -> bool:
    return isinstance(value, bool)


def is_integer(value) -> bool:
    """An int, not a bool (bool is an int subclass: True as a port is a typo, not a number)."""
    return isinstance(value, int) and not isinstance(value, bool)


def integer(low: int, high: int) -> Callable[[object], bool]:
    """An int (not a bool) in [low, high]."""
    return lambda value: is_integer(value) and low <= value <= high


def number(low: float, high: float, *, low_open: bool = False,
           high_open: bool = False) -> Callable[[object], bool]:
    """An int or float (not a bool) in the range, each end closed unless said open."""
    def valid(value) -> bool:
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            return False
        return ((low < value if low_open else low <= value)
                and (value < high if high_open else value <= high))
    return valid


def one_of(*choices) -> Callable[[object], bool]:
    return lambda value: isinstance(value, str) and value in choices


def text(value) -> bool:
    """A string with something in it."""
    return isinstance(value, str) and bool(value.strip())


def matching(pattern: re.Pattern) -> Callable[[object], bool]:
    return lambda value: isinstance(value, str) and bool(pattern.match(value))


def absolute_path(value) -> bool:
    return isinstance(value, str) and value.startswith("/") and ".." not in value.split("/")


def strings(value) -> bool:
    """A list of non-empty strings."""
    return isinstance(value, (list, tuple)) and all(isinstance(v, str) and v for v in value)


def optional(valid: Callable[[object], bool]) -> Callable[[object], bool]:
    """None (the key's "not set"), or what `valid` accepts."""
    return lambda value: value is None or valid(value)


def own_folder(value) -> bool:
    """An absolute literal path, in a folder of its own (never a shared one like /var/lib)."""
    return (matching(LITERAL_PATH)(value) and ".." not in value.split("/")
            and value.rstrip("/") not in SHARED_FOLDERS | {""})


def _file_in_own_folder(suffix: str) -> Callable[[object], bool]:
    def valid(value) -> bool:
        return (own_folder(value) and value.endswith(suffix)
                and value.rsplit("/", 1)[0] not in SHARED_FOLDERS | {""})
    return valid


def _pinned_images(value) -> bool:
    if not isinstance(value, dict):
        return False
    for arch, reference in value.items():
        pinned = IMAGE_REFERENCE.match(reference) if isinstance(reference, str) else None
        if arch not in IMAGE_ARCH or not pinned or pinned["tag"] == "latest":
            return False
    return True


def _environment(value) -> bool:
    return isinstance(value, dict) and all(isinstance(k, str) and k and isinstance(v, str)
                                           for k, v in value.items())


def _json_mapping(value) -> bool:
    if not isinstance(value, dict):
        return False
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


def _busbw_floors(value) -> bool:
    # Empty is a choice: no model has a floor, and the check says so for each.
    return isinstance(value, dict) and all(
        isinstance(model, str) and model and number(0, 10000, low_open=True)(gbps)
        for model, gbps in value.items())


def _calendar(value) -> bool:
    """One line of systemd OnCalendar, not cron (whose lines OnCalendar does not read)."""
    return (text(value) and "\n" not in value and "\r" not in value
            and not CRON_LINE.match(value) and not CRON_MACRO.match(value.strip()))


def _command(value) -> bool:
    try:
        return isinstance(value, str) and bool(shlex.split(value))
    except ValueError:
        return False


def _file_mode(value) -> bool:
    return integer(0, 0o777)(value) and not value & 0o111


def _run_id(value) -> bool:
    # pyinfra's --data turns `bench_run_id=42` into a number: a number is a name too.
    return value is None or is_integer(value) or matching(RUN_ID)(value)


# ---- the declarations ------------------------------------------------------------------------
@dataclass(frozen=True)
class Key:
    name: str
    default: object
    need: str  # what a valid value is, as the error says it
    valid: Callable[[object], bool]
    doc: str  # what the key means (the README's table)
    concern: str  # the module that reads it
    show: Callable[[object], str] = repr  # how a found value is written in an error


def _keys(concern: str, *keys: tuple) -> tuple[Key, ...]:
    return tuple(Key(name, default, need, valid, doc, concern, *rest)
                 for name, default, need, valid, doc, *rest in keys)


KEYS: tuple[Key, ...] = (
    *_keys(
        "tasks/system.py",
        ("host_packages", ["python3-venv", "libnuma1", "curl", "iproute2"],
         "a list of Debian package names", strings,
         "OS packages every serving host needs (vLLM links libnuma; the venv runtime needs "
         "venv; the health wait uses curl; preflight reads listening ports with ss). "
         "Installed packages cost nothing, so offline hosts are fine."),
    ),
    *_keys(
        "tasks/preflight.py",
        ("preflight_accept_low_gpu_memory", False, "true or false", boolean,
         "Proceed although GPU memory x utilisation is under the profile's minimum (a tight "
         "KV cache). Weights larger than the usable GPU memory are refused regardless. The "
         "seed ran Kimi-K2.6 INT4 (recipe: >= 714 GB) on 4 x GB200 (~666 GB usable at 0.90) "
         "with a tight KV cache; kimi-k2.6-nvfp4 (600 GB) is the roomier choice on Blackwell."),
        ("nvidia_driver_min_branch", 580, "a driver branch like 580 (400..9999)",
         integer(400, 9999),
         "Oldest NVIDIA driver branch accepted on GPU hosts (CUDA 13 builds of vLLM need 580)."),
    ),
    *_keys(
        "tests/infra",
        ("nvidia_gpu_model", None, "None (any GPU model) or the name nvidia-smi reports, e.g. "
         "NVIDIA GB200", optional(text),
         "GPU model every GPU of the host must report (infra checks); None accepts any."),
        ("nvidia_allreduce_min_busbw_gbps", {"NVIDIA H200": 300, "NVIDIA GB200": 600},
         "a mapping of GPU model (as nvidia-smi names it) to GB/s, each in (0, 10000]",
         _busbw_floors,
         "Interconnect acceptance (tests/infra -m interconnect): least all-reduce bus "
         "bandwidth, GB/s, per GPU model. NVLink 4 (H200 SXM, 900 GB/s) and NVLink 5 (GB200, "
         "1.8 TB/s) reach far more."),
        ("nvidia_allreduce_bytes", 2**30, "bytes, 2**20..2**35 (1 MiB..32 GiB per GPU)",
         integer(2**20, 2**35),
         "Bytes all-reduced per step in that test (1 GiB, as nccl-tests' large sizes)."),
        ("nvidia_allreduce_python", None, "None or a python on the host: a command on its PATH "
         "or an absolute path", optional(text),
         "Python with torch and NCCL on the host for that test; None uses the vLLM venv's."),
        ("weights_min_free_bytes", 100 * 10**9, "bytes, 0..1e15 (1 PB)", number(0, 1e15),
         "Free space the infra checks require on the weights filesystem once the weights are "
         "in (room for logs, caches and the next revision)."),
    ),
    *_keys(
        "tasks/nvidia.py",
        ("docker_package", "docker.io", "a Debian package name, e.g. docker.io", text,
         "Debian package that provides dockerd: docker.io from the distribution, or docker-ce "
         "where the host has Docker's own apt source (installing one beside the other removes "
         "the other)."),
        ("docker_daemon_settings", {"log-opts": {"max-file": "3", "max-size": "100m"}},
         "a mapping of daemon.json settings, JSON values only", _json_mapping,
         "/etc/docker/daemon.json besides the \"nvidia\" runtime entry the task always adds "
         "(as `nvidia-ctk runtime configure` does). The task owns the whole file: edits on the "
         "host are replaced, and docker restarts only when the file changes. Log rotation "
         "keeps a long-running vLLM container from filling the disk."),
        ("nvidia_container_toolkit_package", "nvidia-container-toolkit",
         "a Debian package name, e.g. nvidia-container-toolkit", text,
         "NVIDIA Container Toolkit package, from the NVIDIA apt repository the operator "
         "configured (this deploy adds no apt sources); \"name=version\" pins it."),
        ("nvidia_driver_install", False, "true or false", boolean,
         "Install nvidia_driver_package when the loaded driver is missing or older than "
         "nvidia_driver_min_branch. Off: the deploy stops on such a host and says so."),
        ("nvidia_driver_package", "nvidia-driver-580-open",
         "a Debian package name, e.g. nvidia-driver-580-open", text,
         "Driver package installed when nvidia_driver_install is on (Blackwell GPUs need the "
         "open kernel modules)."),
        ("nvidia_driver_allow_reboot", False, "true or false", boolean,
         "Reboot after a driver install when the loaded kernel module is not the installed "
         "version (a new driver loads only at boot). Off: the deploy warns and the operator "
         "reboots."),
    ),
    *_keys(
        "tasks/models.py",
        ("model_profile", "kimi-k2.6", f"one of {sorted(PROFILES)} (tasks/models.py)",
         one_of(*PROFILES),
         "Catalog entry in tasks/models.py: kimi-k2.6 (INT4, the seed), kimi-k2.6-nvfp4, "
         "sandbox-tiny."),
        ("model_revision", None, "None or a commit SHA or tag", optional(text),
         "Hub revision to fetch; None takes the profile's. A profile that runs the "
         "repository's Python (--trust-remote-code: both Kimi-K2.6 profiles) needs a 40-hex "
         "commit here, unless model_accept_moving_revision."),
        ("model_accept_moving_revision", False, "true or false", boolean,
         "Accept a branch or tag for model_revision and model_draft_revision on a profile "
         "that runs the repository's Python (--trust-remote-code): the code run at the next "
         "fetch is then whatever the branch holds by then. False: the preflight refuses."),
        ("model_speculative", False, "true or false", boolean,
         "EAGLE-3 speculative decoding. OFF: the seed measured 1.28% acceptance (1.04 tokens "
         "per step) with lightseekorg/kimi-k2.6-eagle3, and output throughput fell 46% "
         "(1182 -> 631 tok/s)."),
        ("model_draft_repo", "lightseekorg/kimi-k2.6-eagle3-mla",
         "a Hub repo id like owner/name", matching(HUB_REPO_ID),
         "The EAGLE-3 draft fetched when model_speculative is on: the one vLLM's Kimi-K2.6 "
         "recipe names. The seed used lightseekorg/kimi-k2.6-eagle3 (its 1.28% acceptance "
         "suggests the wrong draft)."),
        ("model_draft_revision", "main", "a commit SHA or tag of model_draft_repo", text,
         "Revision of model_draft_repo to fetch when model_speculative is on; a 40-hex commit "
         "where the profile runs remote code, as model_revision."),
        ("model_num_speculative_tokens", None, "None or an integer 1..10",
         optional(integer(1, 10)),
         "Draft tokens proposed per step; None takes the profile's (3, as the seed and the "
         "recipe)."),
        ("model_source_dir", None, "None or a model folder on the controller",
         optional(text),
         "A controller folder pushed as the model instead of a Hub download (sandbox, "
         "air-gapped sites); None downloads model_profile's repo with the hf CLI. Relative "
         "paths are relative to this repository."),
        ("weights_dir", "/raid/models", "an absolute path on the host", absolute_path,
         "Folder on the host that holds one sub-folder per model (the seed: "
         "/raid/<user>/models)."),
    ),
    *_keys(
        "tasks/weights_hub.py",
        ("weights_hf_endpoint", None,
         "None (the Hub) or a mirror's base URL, http(s)://HOST[:PORT]",
         optional(matching(re.compile(r"^https?://[^\s/]+"))),
         "Hub endpoint (HF_ENDPOINT) for metadata and downloads: None is the client's default "
         "Hub; a mirror's base URL otherwise (common for sites in China)."),
        ("weights_hf_token_file", None,
         "None (HF_TOKEN from the controller's environment) or a controller file",
         optional(text),
         "Controller file (outside this repository) holding the Hub token; None reads "
         "HF_TOKEN from the controller's environment. On hosts it lives only in a root-owned "
         "0600 file."),
        ("weights_hf_token_command", None,
         "None or a command line run on the controller, without a shell", optional(_command),
         "Instead of weights_hf_token_file: a command (a secret manager's CLI) whose standard "
         "output is the Hub token, as for vllm_api_key_command."),
        ("weights_include", [], "a list of glob patterns", strings,
         "Glob patterns passed to `hf download --include`; the preflight's size check applies "
         "the same filter."),
        ("weights_exclude", [], "a list of glob patterns", strings,
         "Glob patterns passed to `hf download --exclude`."),
        ("weights_max_workers", 8, "an integer 1..64", integer(1, 64),
         "Files fetched in parallel (`hf download --max-workers`); it parallelises across "
         "files only."),
        ("weights_xet", True, "true or false", boolean,
         "Use Xet transfers when the Hub offers them; a stalled attempt is retried with Xet "
         "off regardless."),
        ("weights_stall_timeout_s", 300,
         "seconds, 30..86400 (the client itself waits 10 s per read and retries 5 times; a "
         "day without a byte is a dead transfer)", integer(30, 86400),
         "Seconds without a new byte before the watchdog stops an attempt."),
        ("weights_download_attempts", 4, "an integer 1..20", integer(1, 20),
         "Attempts before the fetch fails (each: remove *.incomplete, run hf download, verify "
         "checksums)."),
        ("weights_verify_full", False, "true or false", boolean,
         "Re-hash every file against the Hub's checksums on this run; fail naming missing, "
         "corrupt (deleted: the next run re-fetches) and extra files. Slow: ~1 s per GB."),
        ("weights_verify_schedule", "weekly",
         "None (no scheduled verify) or one line of systemd OnCalendar, not cron",
         optional(_calendar),
         "When each Hub-fetched weights folder is re-hashed against the Hub's checksums on the "
         "host (weights-verify-*.timer, idle IO priority): bit rot keeps a file's size and "
         "mtime, which is all a deploy or drift check reads. It deletes nothing; a file found "
         "corrupt is reported by the drift check and fetched again by the next deploy."),
        ("weights_peer_copy", False, "true or false", boolean,
         "Fetch from the Hub once per fleet: the serving hosts with this key on, in inventory "
         "order, form a tree; the first fetches from the Hub, host i copies from host "
         "(i-1)//2 and then that host's own sources, and each serves its verified files on "
         "weights_peer_port. Every copy is checked against the Hub's checksums; what no peer "
         "gives (down, dead mid-copy, a bad file) comes from the Hub."),
        ("weights_peer_port", 8790, "a TCP port 1024..65535", integer(1024, 65535),
         "Port of this host's weights server (weights-peer.service) when weights_peer_copy is "
         "on."),
        ("weights_peer_address", None,
         "None (ssh_hostname, else the inventory name) or an address of this host",
         optional(text),
         "Address the weights server binds to and peers reach it at: the trays' private "
         "network. It takes no key: whoever reaches it can read the weights."),
    ),
    *_keys(
        "tasks/hf_cli.py",
        ("hf_cli_version", "2.4.0", "a huggingface_hub version like 2.4.0",
         matching(re.compile(r"^[0-9][0-9A-Za-z.+-]*$")),
         "huggingface_hub version of the host's `hf` CLI; must match hf_cli_wheelhouse_dir."),
        ("hf_cli_venv_dir", "/opt/hf/venv", "an absolute path on the host", absolute_path,
         "venv of the hf CLI on the host (a symlink to the current build); /usr/local/bin/hf "
         "points into it."),
        ("hf_cli_wheelhouse_dir", ".cache/hf-wheelhouse", "a folder made by hf-wheelhouse",
         text, "Controller folder made by hf-wheelhouse (hosts reach no package index)."),
    ),
    *_keys(
        "tasks/settings.py",
        ("vllm_runtime", "venv", f"one of {list(RUNTIMES)}", one_of(*RUNTIMES),
         "How vLLM runs: docker (the pinned image under systemd: vllm.service runs `docker "
         "run`), kubernetes (the objects of templates/k8s, applied from the k8s_control host; "
         "the serving hosts get the weights), or venv (pip-installed under systemd, from a "
         "wheelhouse)."),
        ("vllm_host", "0.0.0.0", "an address to listen on, e.g. 0.0.0.0", text,
         "Address vLLM listens on (the seed: 0.0.0.0). Beyond loopback only with "
         "vllm_api_key_file, or vllm_accept_open_endpoint."),
        ("vllm_accept_open_endpoint", False, "true or false", boolean,
         "Serve beyond loopback without an API key (vllm_api_key_file None), for an endpoint "
         "meant to be open to whoever reaches it. False: the preflight refuses. The key never "
         "covers /health and /metrics either way."),
        ("vllm_port", 8000, "a TCP port 1..65535", integer(1, 65535),
         "TCP port vLLM listens on (the seed: 8000)."),
        ("vllm_tensor_parallel_size", None, "None or a positive integer",
         optional(integer(1, 1024)),
         "GPUs one server shards the model over; None takes the profile's (kimi-k2.6: 4)."),
        ("vllm_gpu_memory_utilization", None, "None or a fraction in (0, 1]",
         optional(number(0, 1, low_open=True)),
         "Fraction of each GPU's memory vLLM may take; None takes the profile's (kimi-k2.6: "
         "0.90)."),
        ("vllm_shutdown_timeout_s", 60, "seconds, 0..3600", integer(0, 3600),
         "Seconds vLLM gives in-flight requests to finish after SIGTERM before it aborts them "
         "(`--shutdown-timeout`, vLLM >= 0.18; 0: abort at once, vLLM's default). The unit's "
         "stop, `docker stop` and the pod's termination grace allow this plus 30 s."),
        ("vllm_extra_args", [], "a list of strings", strings,
         "Appended verbatim to `vllm serve` (e.g. [\"--max-model-len\", \"65536\"])."),
        ("vllm_environment", {}, "a mapping of NAME: value strings", _environment,
         "Extra, non-secret environment for the server (secrets go in files, below)."),
        ("vllm_cpu_threads_bind", None, "None or a CPU list like 0-3",
         optional(matching(re.compile(r"^[0-9][0-9,|-]*$"))),
         "CPU builds only: CPUs for vLLM's OpenMP threads (VLLM_CPU_OMP_THREADS_BIND), e.g. "
         "\"0-3\"."),
        ("vllm_api_key_file", None, "None or a file on the controller", optional(text),
         "Controller file holding the API key clients must send; None leaves the endpoint "
         "open. The key reaches the host only in a root-owned 0600 env file, never a command "
         "line."),
        ("vllm_api_key_command", None,
         "None or a command line run on the controller, without a shell", optional(_command),
         "Instead of vllm_api_key_file: a command (a secret manager's CLI) whose standard "
         "output is the API key. Run once per deploy on the controller, with no input; a "
         "failure names the key and the exit status, never the output."),
        ("vllm_tls_cert_file", None, "None or a PEM file on the controller", optional(text),
         "vLLM's own TLS (--ssl-certfile): the server certificate, then its chain; its "
         "subjectAltName must name the host's address (ssh_hostname, else its name), which "
         "every client uses (on the kubernetes runtime every node's: one Secret serves "
         "them all). None serves plain HTTP. With vllm_tls_key_file."),
        ("vllm_tls_key_file", None, "None or a PEM file on the controller, outside this "
         "repository", optional(text),
         "The certificate's private key (--ssl-keyfile), unencrypted PEM; on the host only in "
         "a root-owned 0600 file."),
        ("vllm_tls_ca_file", None, "None (the certificate itself) or a PEM file on the "
         "controller", optional(text),
         "What clients of the endpoint trust (the health wait, the infra checks, bench, the "
         "router, which gets it as SSL_CERT_FILE): the CA that signed vllm_tls_cert_file; "
         "None trusts the certificate itself (self-signed)."),
        ("vllm_health_timeout_s", None, "None or seconds, 10..86400 (a day)",
         optional(integer(10, 86400)),
         "Seconds to wait for /health after a (re)start; None derives it from the checkpoint "
         "size: 120 s + size / vllm_load_bytes_per_s (Kimi-K2.6 at 1 GB/s: ~12 min)."),
        ("vllm_load_bytes_per_s", 1.0e9, "bytes per second, 1e6..1e12 (1 MB/s..1 TB/s)",
         number(1e6, 1e12),
         "How fast a host loads weights from disk into GPU memory, for the derived health "
         "timeout."),
        ("vllm_venv_dir", "/opt/vllm/venv", "an absolute path on the host", absolute_path,
         "venv runtime: the venv path on the host (a symlink to the current build, previous "
         "kept)."),
        ("vllm_wheelhouse_dir", None, "None or a folder made by wheelhouse",
         optional(text),
         "venv runtime: controller folder made by wheelhouse (hosts reach no package "
         "index)."),
        ("vllm_image", {"x86_64": "vllm/vllm-openai:v0.19.1-cu130",
                        "aarch64": "vllm/vllm-openai:v0.19.1-cu130"},
         f"a mapping of CPU architecture ({', '.join(IMAGE_ARCH)}) to an image pinned by tag, "
         "not latest, e.g. vllm/vllm-openai:v0.19.1-cu130[@sha256:<64 hex>]",
         optional(_pinned_images),
         "docker runtime: the vLLM image per host CPU architecture (`uname -m`), pinned by tag "
         "and optionally by digest (\"name:tag@sha256:<64 hex>\"). The seed ran v0.19.1-cu130 "
         "on GB200 (aarch64). A bare release tag can be x86-only: `docker manifest inspect "
         "IMAGE` lists a tag's platforms, and the deploy refuses an image whose architecture "
         "is not the host's."),
        ("vllm_image_tarball", None, "None or a `docker save` archive on the controller",
         optional(text),
         "docker runtime, air-gapped sites: a `docker save` archive on the controller holding "
         "the vllm_image tags. It is pushed and `docker load`-ed when the host lacks that "
         "image ID; None pulls from the registry docker is configured for. The unit itself "
         "never pulls."),
        ("vllm_container_gpus", "gpus", f"one of {list(CONTAINER_GPU_MODES)}",
         one_of(*CONTAINER_GPU_MODES),
         "docker runtime: how the container gets GPUs: \"gpus\" (--runtime nvidia --gpus all, "
         "as vLLM's docs), \"cdi\" (--device nvidia.com/gpu=all, from the CDI spec "
         "tasks/nvidia.py writes), or \"none\" (CPU builds, the sandbox)."),
    ),
    *_keys(
        "tasks/vllm_kubernetes.py",
        ("k8s_node_group", "gb200", "the inventory group of the GPU nodes, e.g. gb200", text,
         "Control host: inventory group of the GPU nodes the pod runs on. The objects are "
         "rendered from their data (vllm_runtime = \"kubernetes\" there), which must agree: "
         "one Deployment serves them."),
        ("k8s_namespace", "default", "a namespace name (an RFC 1123 label: a-z, 0-9, -)",
         matching(DNS_LABEL_RFC1123),
         "Namespace of the objects (it must exist; the seed's: default)."),
        ("k8s_name", "kimi-k26", "an RFC 1035 label of at most 53 characters (a-z, 0-9, -; "
         "NAME-gpu-claim must stay a label)", matching(K8S_NAME),
         "Name of the Deployment and the Service and their `app` label; the claim template is "
         "NAME-gpu-claim and the Secret NAME-secrets (the seed's: kimi-k26)."),
        ("k8s_volume_type", "hostPath", f"one of {list(VOLUME_TYPES)}", one_of(*VOLUME_TYPES),
         "Where the pod finds the weights: \"hostPath\" (the nodes' weights_dir, filled by "
         "this deploy, as the seed) or \"persistentVolumeClaim\" (k8s_model_claim)."),
        ("k8s_model_claim", None, "None or a PersistentVolumeClaim name (an RFC 1123 "
         "subdomain)", optional(matching(DNS_SUBDOMAIN_RFC1123)),
         "persistentVolumeClaim only: the claim holding a folder per model, named as under "
         "weights_dir."),
        ("k8s_draft_claim", None, "None or a PersistentVolumeClaim name (an RFC 1123 "
         "subdomain)", optional(matching(DNS_SUBDOMAIN_RFC1123)),
         "persistentVolumeClaim only: the claim holding the EAGLE-3 draft's folder; None: "
         "k8s_model_claim."),
        ("k8s_service_type", "NodePort", f"one of {list(SERVICE_TYPES)}",
         one_of(*SERVICE_TYPES),
         "How the Service exposes vLLM: \"NodePort\" (the seed) or \"ClusterIP\"."),
        ("k8s_node_port", 30180, "a port in the NodePort range 30000-32767",
         integer(30000, 32767),
         "NodePort only: the port every node answers on (the seed's). Checked whatever the "
         "service type, so a switch to NodePort cannot surprise."),
        ("k8s_manifest_dir", "/etc/vllm-kubernetes", "an absolute folder path of its own on "
         "the control host (letters, digits, . _ - / @ +; not a shared folder like /etc)",
         own_folder,
         "Control-host folder holding the rendered objects kubectl applies (secret.yaml: "
         "root, 0600); they are applied only when one of them changes or the cluster differs "
         "from them."),
        ("k8s_kubectl", "kubectl", "the kubectl command, e.g. kubectl or \"k3s kubectl\"",
         _command,
         "The kubectl command on the control host, e.g. \"kubectl\", "
         "\"/usr/local/bin/kubectl\", \"k3s kubectl\"."),
        ("k8s_kubeconfig", None, "None (kubectl's default) or an absolute path on the "
         "control host", optional(absolute_path),
         "kubeconfig on the control host; None: kubectl's default (KUBECONFIG, then "
         "~/.kube/config)."),
        ("k8s_field_manager", "kimi-gb200", "a field manager name of at most 128 characters "
         "(letters, digits, . _ : -)",
         matching(re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")),
         "Server-side apply field manager that owns the fields the objects set; fields "
         "someone else changed by hand are taken back at the next apply."),
        ("k8s_node_name", None, "None or the node's kubernetes.io/hostname label, an RFC 1123 "
         "subdomain of at most 63 characters", optional(matching(NODE_NAME)),
         "A tray's Kubernetes node name, set per host in the inventory; None: its inventory "
         "name without a connector's \"@name/\" prefix. The pod is pinned to the trays of "
         "k8s_node_group, the nodes this deploy filled with the weights: any other node would "
         "wait out the progress deadline."),
    ),
    *_keys(
        "tasks/vllm_router.py",
        ("router_version", "0.1.17", "a vllm-router version like 0.1.17",
         matching(re.compile(r"^[0-9][0-9A-Za-z.+-]*$")),
         "vllm-router version on hosts of the router group; must match router_wheelhouse_dir."),
        ("router_venv_dir", "/opt/vllm-router/venv", "an absolute literal path on the host "
         "(letters, digits and -_./@+,:= only: the unit's ExecStart takes it as is)",
         lambda v: absolute_path(v) and matching(LITERAL_PATH)(v),
         "venv of vllm-router on a router host (a symlink to the current build)."),
        ("router_wheelhouse_dir", ".cache/router-wheelhouse", "a folder made by "
         "router-wheelhouse", text,
         "Controller folder made by router-wheelhouse, for the router hosts' CPU and Python "
         "(router-wheelhouse --arch aarch64 --python-version 3.12 for Ubuntu 24.04 on Grace)."),
        ("router_host", "127.0.0.1", "an IPv4 address to listen on, e.g. 127.0.0.1 or 0.0.0.0",
         matching(re.compile(r"^[0-9]{1,3}(\.[0-9]{1,3}){3}$")),
         "Address the router listens on. Loopback by default: vllm-router's /add_worker, "
         "/remove_worker and /workers take no key (see router_accept_open_admin)."),
        ("router_accept_open_admin", False, "true or false", boolean,
         "Must be true to bind router_host beyond loopback: anyone who reaches the router's "
         "port can then remove backends, or add one that receives the clients' API keys. Say "
         "true only where the network lets just the clients and the deploy reach it."),
        ("router_port", 30000, "a TCP port 1..65535", integer(1, 65535),
         "TCP port clients send OpenAI API requests to (with the trays' API key)."),
        ("router_policy", "cache_aware", "one of ['cache_aware', 'power_of_two', "
         "'round_robin', 'random', 'consistent_hash']",
         one_of("cache_aware", "power_of_two", "round_robin", "random", "consistent_hash"),
         "How the router picks a backend: cache_aware sends a prompt to the tray most likely "
         "to hold its prefix in cache, unless load is too uneven."),
        ("router_health_check_interval_s", 10, "seconds, 1..3600", integer(1, 3600),
         "Seconds between the router's /health probes of each backend (vllm-router's own "
         "default, 60, leaves a dead tray in rotation for minutes)."),
        ("router_backend_group", None, "None or the name of an inventory group",
         optional(matching(re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$"))),
         "Hosts the router sends requests to; None: every host that serves (not in the "
         "router, drift_control or k8s_control groups)."),
        ("vllm_backend_url", None, "None or http://ADDRESS:PORT", optional(matching(
            re.compile(r"^http://[A-Za-z0-9.\[\]:-]+:[0-9]{1,5}$"))),
         "A serving host's URL as the router reaches it; None: http://<ssh_hostname, else "
         "the inventory name>:<vllm_port>."),
        ("router_prometheus_port", 29000, "a TCP port 1..65535", integer(1, 65535),
         "Port of the router's Prometheus metrics, on 127.0.0.1 (node-local scrapers)."),
    ),
    *_keys(
        "tools/rollout.py",
        ("vllm_rollout_batch", 1, "a positive integer", integer(1, 1024),
         "rollout: trays restarted at a time after the canary (always one tray), each batch "
         "taken out of the routers, deployed, waited healthy and put back before the next."),
    ),
    *_keys(
        "tasks/drift_control.py",
        ("drift_repo_dir", None, "an absolute path on the control host to a checkout of this "
         "repository with its .venv (letters, digits and -_./@+,:= only: the unit's "
         "ExecStart takes it as is)", optional(lambda v: absolute_path(v)
                                               and matching(LITERAL_PATH)(v)),
         "Control host: absolute path of a checkout of this repository with its .venv (the "
         "timer runs it). Required on drift_control hosts: no default."),
        ("drift_inventory", "inventories/gb200.py", "an inventory path relative to "
         "drift_repo_dir, e.g. inventories/gb200.py",
         lambda v: (matching(re.compile(r"^[A-Za-z0-9_.@+,:=-][A-Za-z0-9_./@+,:=-]*$"))(v)
                    and ".." not in v.split("/")),
         "Inventory the drift check compares with the declared state, relative to "
         "drift_repo_dir."),
        ("drift_schedule", "*:0/15", "one line of systemd OnCalendar, not cron (every 15 "
         "minutes is *:0/15; see `systemd-analyze calendar`)", _calendar,
         "When the check runs: systemd OnCalendar syntax, not cron (every 15 minutes: "
         "*:0/15)."),
        ("drift_out_dir", "/var/lib/vllm-drift", "an absolute folder path of its own on the "
         "control host (not a shared one like /var/lib)", own_folder,
         "Control-host folder for the latest report (report.json, junit.xml, drift.prom)."),
        ("drift_textfile", "/var/lib/prometheus/node-exporter/vllm_drift.prom",
         "an absolute path ending in .prom, in node_exporter's textfile collector folder (a "
         "folder of its own)", _file_in_own_folder(".prom"),
         "Prometheus textfile that SREs alert on; node_exporter's textfile collector reads "
         "*.prom only."),
        ("drift_user", "root", "a user name on the control host that holds the SSH key",
         matching(USER_NAME),
         "Account the check runs as: it logs in to the hosts with this user's SSH key and "
         "known_hosts."),
        ("drift_report_mode", 0o600, "a file mode 0o000..0o666 without execute bits, e.g. "
         "0o600 (root only) or 0o644", _file_mode,
         "File mode of the drift reports (report.json, junit.xml) and, with search bits "
         "added, of their folder: root only by default. No secret is written to them either "
         "way; 0o644 lets any local user read them. The Prometheus textfile stays 0644 for "
         "node_exporter.", lambda v: oct(v) if is_integer(v) and v >= 0 else repr(v)),
    ),
    *_keys(
        "tasks/bench.py",
        ("bench_profile", "seed-8k-1k", f"one of {list(BENCH_PROFILES)} (tasks/bench.py)",
         one_of(*BENCH_PROFILES),
         "Workload profile in tasks/bench.py: seed-8k-1k (the seed's section 6: random 8000 "
         "in / 1024 out, 32 prompts at 10 req/s, --ignore-eos) or sandbox (64 in / 32 out, 16 "
         "prompts at 4 req/s)."),
        ("bench_run_id", None, "None (a timestamp) or a folder name of letters, digits, '.', "
         "'_' and '-'", _run_id,
         "Name of the run's results folder; None: the UTC start time and the profile, one per "
         "run."),
        ("bench_results_dir", "results/bench", "a folder on the controller", text,
         "Controller folder that receives <run id>/<host>.json, the /metrics scrapes and the "
         "client's log. Relative paths are relative to this repository."),
        ("bench_host_dir", "/var/lib/vllm-bench", "an absolute path on the host",
         absolute_path,
         "Folder on the host where each run's raw results are written before they are "
         "fetched."),
        ("bench_baseline", "baselines/seed-kimi-k2.6-4xgb200.json",
         "a result file or run folder on the controller", text,
         "What bench-report compares a run with by default: the seed's numbers (4 x "
         "GB200, vLLM v0.19.1), or a previous run's folder."),
        ("bench_regression_tolerance", 0.10, "a fraction in [0, 1)",
         number(0, 1, high_open=True),
         "bench-report: a regression is throughput lower, or latency higher, than the "
         "baseline by more than this fraction (exit 1)."),
        ("bench_regression_p99_tolerance", 0.25, "a fraction in [0, 1)",
         number(0, 1, high_open=True),
         "The same for p99 latencies, which swing more: 32 requests give a p99 from one or two "
         "of them."),
        ("bench_speculative_min_gain", 0.05, "a fraction in [0, 1)",
         number(0, 1, high_open=True),
         "bench-report ab: the output-throughput gain speculative decoding must show to "
         "be recommended ON (below it, the draft's memory and moving parts are not worth it)."),
    ),
)
BY_NAME: dict[str, Key] = {key.name: key for key in KEYS}
DEFAULTS: dict[str, object] = {key.name: key.default for key in KEYS}


# ---- problems, and the one reader that finds them --------------------------------------------
@dataclass(frozen=True)
class Problem:
    """One thing wrong with one host's data: `host: key: found X; need Y`."""

    host: str
    key: str
    found: str  # as written in the message (repr, or the key's own `show`)
    need: str

    def __str__(self) -> str:
        return f"{self.host}: {self.key}: found {self.found}; need {self.need}"


@dataclass(frozen=True)
class UnknownKey(Problem):
    def __str__(self) -> str:
        return f"{self.host}: {self.key}: {self.need}"


def problem(host: str, key: str, found, need: str) -> Problem:
    """A problem with a key's value, written the way its declaration shows values."""
    shown = BY_NAME[key].show(found) if key in BY_NAME else repr(found)
    return Problem(host, key, shown, need)


class DataError(PyinfraError):
    """Host data that cannot work: `problems` holds them all, one line each in the message."""

    def __init__(self, problems: Iterable[Problem]):
        self.problems = list(problems)
        super().__init__("invalid host data:\n  "
                         + "\n  ".join(str(item) for item in self.problems))


@functools.cache
def _pyinfra_keys() -> frozenset[str]:
    """Keys pyinfra itself reads from host data: its connectors' and its global arguments."""
    from pyinfra.api.arguments import all_global_arguments
    from pyinfra.api.connectors import get_all_connectors
    names = {name for name, _ in all_global_arguments()}
    for connector in get_all_connectors().values():
        names.update(getattr(connector, "data_meta", {}))
    return frozenset(names)


def as_dict(data) -> dict:
    """pyinfra's HostData (override, host, group data merged) or a plain mapping."""
    return data.dict() if hasattr(data, "dict") and not isinstance(data, Mapping) else dict(data)


def check(host_name: str, data) -> list[Problem]:
    """Every problem of one host's data: each declared key's value against its need, and each
    key no declaration (nor pyinfra) knows, with the closest known name."""
    values = as_dict(data)
    problems = [problem(host_name, key.name, values.get(key.name), key.need)
                for key in KEYS if not key.valid(values.get(key.name))]
    known = _pyinfra_keys()
    for name in sorted(set(values) - set(BY_NAME) - known):
        if name.startswith("__"):
            continue
        close = difflib.get_close_matches(name, BY_NAME, n=1, cutoff=0.6)
        hint = f"did you mean {close[0]}?" if close else "no data key of this name is declared " \
            "(tasks/data_keys.py lists them)"
        problems.append(UnknownKey(host_name, name, repr(values[name]),
                                   f"unknown key; {hint}"))
    return problems


def read(host_name: str, data) -> dict[str, object]:
    """The host's value of every declared key, after `check`; DataError holds every problem."""
    problems = check(host_name, data)
    if problems:
        raise DataError(problems)
    values = as_dict(data)
    return {key.name: values.get(key.name) for key in KEYS}
