"""Every default, for every host. Grouped by the task that reads it; each key commented.

Group files (gb200.py, sandbox.py) hold differences only; inventories hold per-machine facts.
README.md's data-keys table is kept in step with this file by tests/unit/test_readme.py.
"""

# ---- system: packages and the weights folder (tasks/system.py) -----------------------------
# OS packages every serving host needs (vLLM links libnuma; the venv runtime needs venv; the
# health wait uses curl; preflight reads listening ports with ss). Installed packages cost
# nothing, so offline hosts are fine.
host_packages = ["python3-venv", "libnuma1", "curl", "iproute2"]

# ---- preflight: checks before any change (tasks/preflight.py) -------------------------------
# Proceed although GPU memory x utilisation is under the profile's minimum (a tight KV cache).
# Weights larger than the usable GPU memory are refused regardless. The seed ran Kimi-K2.6 INT4 (recipe: >= 714 GB) on 4 x GB200 (~666 GB usable at 0.90) with a tight KV
# cache; kimi-k2.6-nvfp4 (600 GB) is the roomier choice on Blackwell.
preflight_accept_low_gpu_memory = False
# Oldest NVIDIA driver branch accepted on GPU hosts (CUDA 13 builds of vLLM need 580).
nvidia_driver_min_branch = 580
# GPU model every GPU of the host must report (infra checks); None accepts any.
nvidia_gpu_model = None
# Interconnect acceptance (tests/infra -m interconnect): least all-reduce bus bandwidth, GB/s,
# per GPU model, each in (0, 10000]. NVLink 4 (H200 SXM, 900 GB/s) and NVLink 5 (GB200,
# 1.8 TB/s) reach far more.
nvidia_allreduce_min_busbw_gbps = {"NVIDIA H200": 300, "NVIDIA GB200": 600}
# Bytes all-reduced per step in that test (1 GiB, as nccl-tests' large sizes; 2**20..2**35).
nvidia_allreduce_bytes = 2**30
# Python with torch and NCCL on the host for that test; None uses the vLLM venv's.
nvidia_allreduce_python = None

# ---- nvidia: the container host of the docker runtime (tasks/nvidia.py) ----------------------
# Debian package that provides dockerd: docker.io from the distribution, or docker-ce where
# the host has Docker's own apt source (installing one beside the other removes the other).
docker_package = "docker.io"
# /etc/docker/daemon.json besides the "nvidia" runtime entry the task always adds (as
# `nvidia-ctk runtime configure` does). The task owns the whole file: edits on the host are
# replaced, and docker restarts only when the file changes. Log rotation keeps a long-running
# vLLM container from filling the disk.
docker_daemon_settings = {"log-opts": {"max-file": "3", "max-size": "100m"}}
# NVIDIA Container Toolkit package, from the NVIDIA apt repository the operator configured
# (this deploy adds no apt sources); "name=version" pins it.
nvidia_container_toolkit_package = "nvidia-container-toolkit"
# Install nvidia_driver_package when the loaded driver is missing or older than
# nvidia_driver_min_branch. Off: the deploy stops on such a host and says so.
nvidia_driver_install = False
# Driver package installed when nvidia_driver_install is on (Blackwell GPUs need the open
# kernel modules).
nvidia_driver_package = "nvidia-driver-580-open"
# Reboot after a driver install when the loaded kernel module is not the installed version (a
# new driver loads only at boot). Off: the deploy warns and the operator reboots.
nvidia_driver_allow_reboot = False

# ---- model: which model and where its weights live (tasks/models.py, tasks/weights.py) -------
# Catalog entry in tasks/models.py: kimi-k2.6 (INT4, the seed), kimi-k2.6-nvfp4, sandbox-tiny.
model_profile = "kimi-k2.6"
# Hub revision to fetch; None takes the profile's. Pin a commit SHA in production.
model_revision = None
# EAGLE-3 speculative decoding. OFF: the seed measured 1.28% acceptance (1.04 tokens per
# step) with lightseekorg/kimi-k2.6-eagle3, and output throughput fell 46% (1182 -> 631 tok/s).
model_speculative = False
# The EAGLE-3 draft fetched when model_speculative is on: the one vLLM's Kimi-K2.6 recipe
# names. The seed used lightseekorg/kimi-k2.6-eagle3 (its 1.28% acceptance suggests the wrong
# draft).
model_draft_repo = "lightseekorg/kimi-k2.6-eagle3-mla"
# Draft tokens proposed per step; None takes the profile's (3, as the seed and the recipe).
model_num_speculative_tokens = None
# A controller folder pushed as the model instead of a Hub download (sandbox, air-gapped
# sites); None downloads model_profile's repo with the hf CLI. Relative paths are relative to
# this repository.
model_source_dir = None
# Folder on the host that holds one sub-folder per model (the seed: /raid/<user>/models).
weights_dir = "/raid/models"
# Free space the infra checks require on the weights filesystem once the weights are in
# (room for logs, caches and the next revision). Range 0..1e15.
weights_min_free_bytes = 100 * 10**9

# Revision of model_draft_repo to fetch when model_speculative is on. Pin a commit SHA in
# production.
model_draft_revision = "main"
# Hub endpoint (HF_ENDPOINT) for metadata and downloads: None is the client's default Hub; a
# mirror's base URL otherwise (common for sites in China).
weights_hf_endpoint = None
# Controller file (outside this repository) holding the Hub token; None reads HF_TOKEN from the
# controller's environment. On hosts it lives only in a root-owned 0600 file.
weights_hf_token_file = None
# Glob patterns passed to `hf download --include`; the preflight's size check applies the same
# filter.
weights_include = []
# Glob patterns passed to `hf download --exclude`.
weights_exclude = []
# Files fetched in parallel (`hf download --max-workers`); it parallelises across files only.
weights_max_workers = 8
# Use Xet transfers when the Hub offers them; a stalled attempt is retried with Xet off
# regardless.
weights_xet = True
# Seconds without a new byte before the watchdog stops an attempt (well above the client's own
# 10 s read timeout x 5 retries; 30..86400).
weights_stall_timeout_s = 300
# Attempts before the fetch fails (each: remove *.incomplete, run hf download, verify
# checksums).
weights_download_attempts = 4
# Re-hash every file against the Hub's checksums on this run; fail naming missing, corrupt
# (deleted: the next run re-fetches) and extra files. Slow: ~1 s per GB.
weights_verify_full = False

# ---- hf_cli: the Hugging Face CLI on the host (tasks/hf_cli.py) -------------------------------
# huggingface_hub version of the host's `hf` CLI; must match hf_cli_wheelhouse_dir.
hf_cli_version = "2.4.0"
# venv of the hf CLI on the host (a symlink to the current build); /usr/local/bin/hf points
# into it.
hf_cli_venv_dir = "/opt/hf/venv"
# Controller folder made by tools/hf-wheelhouse (hosts reach no package index).
hf_cli_wheelhouse_dir = ".cache/hf-wheelhouse"

# ---- vllm: the server (tasks/vllm_service.py, vllm_venv.py, vllm_container.py) -------------
# How vLLM runs: docker (the pinned image under systemd: vllm.service runs `docker run`),
# kubernetes (the objects of templates/k8s, applied from the k8s_control host; the serving
# hosts get the weights), or venv (pip-installed under systemd, from a wheelhouse).
vllm_runtime = "venv"
# Address vLLM listens on (the seed: 0.0.0.0).
vllm_host = "0.0.0.0"
# TCP port vLLM listens on (the seed: 8000).
vllm_port = 8000
# GPUs one server shards the model over; None takes the profile's (kimi-k2.6: 4).
vllm_tensor_parallel_size = None
# Fraction of each GPU's memory vLLM may take; None takes the profile's (kimi-k2.6: 0.90).
vllm_gpu_memory_utilization = None
# Appended verbatim to `vllm serve` (e.g. ["--max-model-len", "65536"]).
vllm_extra_args = []
# Extra, non-secret environment for the server (secrets go in files, below).
vllm_environment = {}
# CPU builds only: CPUs for vLLM's OpenMP threads (VLLM_CPU_OMP_THREADS_BIND), e.g. "0-3".
vllm_cpu_threads_bind = None
# Controller file holding the API key clients must send; None leaves the endpoint open.
# The key reaches the host only in a root-owned 0600 env file, never a command line.
vllm_api_key_file = None
# Seconds to wait for /health after a (re)start; None derives it from the checkpoint size:
# 120 s + size / vllm_load_bytes_per_s (Kimi-K2.6 at 1 GB/s: ~12 min). Range 10..86400.
vllm_health_timeout_s = None
# How fast a host loads weights from disk into GPU memory, for the derived health timeout
# (1e6..1e12 bytes per second).
vllm_load_bytes_per_s = 1.0e9
# venv runtime: the venv path on the host (a symlink to the current build, previous kept).
vllm_venv_dir = "/opt/vllm/venv"
# venv runtime: controller folder made by tools/wheelhouse (hosts reach no package index).
vllm_wheelhouse_dir = None

# docker runtime: the vLLM image per host CPU architecture (`uname -m`), pinned by tag and
# optionally by digest ("name:tag@sha256:<64 hex>"). The seed ran v0.19.1-cu130 on GB200
# (aarch64). A bare release tag can be x86-only: `docker manifest inspect IMAGE` lists a tag's
# platforms, and the deploy refuses an image whose architecture is not the host's.
vllm_image = {"x86_64": "vllm/vllm-openai:v0.19.1-cu130",
              "aarch64": "vllm/vllm-openai:v0.19.1-cu130"}
# docker runtime, air-gapped sites: a `docker save` archive on the controller holding the
# vllm_image tags. It is pushed and `docker load`-ed when the host lacks that image ID; None
# pulls from the registry docker is configured for. The unit itself never pulls.
vllm_image_tarball = None
# docker runtime: how the container gets GPUs: "gpus" (--runtime nvidia --gpus all, as vLLM's
# docs), "cdi" (--device nvidia.com/gpu=all, from the CDI spec tasks/nvidia.py writes), or
# "none" (CPU builds, the sandbox).
vllm_container_gpus = "gpus"

# ---- kubernetes: the seed's objects, applied from a k8s_control host (tasks/vllm_kubernetes.py)
# Control host: inventory group of the GPU nodes the pod runs on. The objects are rendered from
# their data (vllm_runtime = "kubernetes" there), which must agree: one Deployment serves them.
k8s_node_group = "gb200"
# Namespace of the objects (it must exist; the seed's: default).
k8s_namespace = "default"
# Name of the Deployment and the Service and their `app` label; the claim template is
# NAME-gpu-claim and the Secret NAME-secrets (the seed's: kimi-k26).
k8s_name = "kimi-k26"
# Where the pod finds the weights: "hostPath" (the nodes' weights_dir, filled by this deploy,
# as the seed) or "persistentVolumeClaim" (k8s_model_claim).
k8s_volume_type = "hostPath"
# persistentVolumeClaim only: the claim holding a folder per model, named as under weights_dir.
k8s_model_claim = None
# persistentVolumeClaim only: the claim holding the EAGLE-3 draft's folder; None: k8s_model_claim.
k8s_draft_claim = None
# How the Service exposes vLLM: "NodePort" (the seed) or "ClusterIP".
k8s_service_type = "NodePort"
# NodePort only: the port every node answers on (the seed's; range 30000-32767).
k8s_node_port = 30180
# Control-host folder holding the rendered objects kubectl applies (secret.yaml: root, 0600);
# they are applied only when one of them changes or the cluster differs from them.
k8s_manifest_dir = "/etc/vllm-kubernetes"
# The kubectl command on the control host, e.g. "kubectl", "/usr/local/bin/kubectl", "k3s kubectl".
k8s_kubectl = "kubectl"
# kubeconfig on the control host; None: kubectl's default (KUBECONFIG, then ~/.kube/config).
k8s_kubeconfig = None
# Server-side apply field manager that owns the fields the objects set; fields someone else
# changed by hand are taken back at the next apply.
k8s_field_manager = "kimi-gb200"
# A tray's Kubernetes node name (its kubernetes.io/hostname label: a DNS-1123 subdomain of at
# most 63 characters), set per host in the inventory; None: its inventory name without a
# connector's "@name/" prefix. The pod is pinned to the trays of k8s_node_group, the nodes this
# deploy filled with the weights: any other node would wait out the progress deadline.
k8s_node_name = None

# ---- drift: the drift check on a timer, on hosts of group drift_control (tasks/drift_control.py)
# Control host: absolute path of a checkout of this repository with its .venv (the timer runs it).
drift_repo_dir = None  # required on drift_control hosts
# Inventory the drift check compares with the declared state, relative to drift_repo_dir.
drift_inventory = "inventories/gb200.py"
# When the check runs: systemd OnCalendar syntax, not cron (every 15 minutes: *:0/15).
drift_schedule = "*:0/15"
# Control-host folder for the latest report (report.json, junit.xml, drift.prom).
drift_out_dir = "/var/lib/vllm-drift"
# Prometheus textfile that SREs alert on; node_exporter's textfile collector reads *.prom only.
drift_textfile = "/var/lib/prometheus/node-exporter/vllm_drift.prom"
# Account the check runs as: it logs in to the hosts with this user's SSH key and known_hosts.
drift_user = "root"
# File mode of the drift reports (report.json, junit.xml) and, with search bits added, of
# their folder: root only by default. No secret is written to them either way; 0o644 lets any
# local user read them. The Prometheus textfile stays 0644 for node_exporter.
drift_report_mode = 0o600

# ---- bench: `vllm bench serve` on every host (bench.py, tasks/bench.py, tools/bench-report) --
# Workload profile in tasks/bench.py: seed-8k-1k (the seed's section 6: random 8000 in / 1024
# out, 32 prompts at 10 req/s, --ignore-eos) or sandbox (64 in / 32 out, 16 prompts at 4 req/s).
bench_profile = "seed-8k-1k"
# Name of the run's results folder; None: the UTC start time and the profile, one per run.
bench_run_id = None
# Controller folder that receives <run id>/<host>.json, the /metrics scrapes and the client's
# log. Relative paths are relative to this repository.
bench_results_dir = "results/bench"
# Folder on the host where each run's raw results are written before they are fetched.
bench_host_dir = "/var/lib/vllm-bench"
# What tools/bench-report compares a run with by default: the seed's numbers (4 x GB200,
# vLLM v0.19.1), or a previous run's folder.
bench_baseline = "baselines/seed-kimi-k2.6-4xgb200.json"
# tools/bench-report: a regression is throughput lower, or latency higher, than the baseline by
# more than this fraction (exit 1).
bench_regression_tolerance = 0.10
# The same for p99 latencies, which swing more: 32 requests give a p99 from one or two of them.
bench_regression_p99_tolerance = 0.25
# tools/bench-report ab: the output-throughput gain speculative decoding must show to be
# recommended ON (below it, the draft's memory and moving parts are not worth it).
bench_speculative_min_gain = 0.05
