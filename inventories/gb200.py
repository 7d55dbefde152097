"""Production example: GB200 compute trays (aarch64 Grace, 4 x Blackwell GPUs each).

    pyinfra inventories/gb200.py deploy.py

Replace the placeholder addresses (TEST-NET-2, never routable) with your trays'. Per-machine
facts only; shared settings live in group_data/gb200.py and group_data/all.py.

With GB200_FAKE=seed every host below becomes `@fake/<name>` (pyinfra's fake connector): the
trays answer the deploy's facts as the seed's GB200 tray does (inventories/seed_facts.py), the
other hosts as bare hosts, so the whole plan shows with no machine:

    tools/gb200-dry-run [--runtime docker|kubernetes] [--json]
    GB200_FAKE=seed [GB200_FAKE_RUNTIME=kubernetes] pyinfra inventories/gb200.py deploy.py --dry

The preflight asks the Hub for the weights' listing from the controller: tools/gb200-dry-run
serves a Kimi-K2.6-shaped repo of sparse files from tools/hub-mirror on 127.0.0.1 and passes
`--data weights_hf_endpoint=URL`; without it, the controller asks huggingface.co.
"""

import importlib.util
import os
from pathlib import Path

from tasks.inventory_check import refuse_duplicates as _refuse_duplicates

gb200 = [
    # (name, {connection and per-machine data})
    ("gb200-tray-01", {"ssh_hostname": "198.51.100.11", "ssh_user": "root"}),
    ("gb200-tray-02", {"ssh_hostname": "198.51.100.12", "ssh_user": "root"}),
]

# The host that runs the drift check on a timer (tools/drift-check, tasks/drift_control.py):
# a bastion with a checkout of this repository, its .venv and an SSH key for the trays.
drift_control = [
    ("drift-control-01", {"ssh_hostname": "198.51.100.2", "ssh_user": "root",
                          "drift_repo_dir": "/opt/kimi-gb200"}),
]

# vllm_runtime = "kubernetes" only: the host that applies the Kubernetes objects rendered from
# the trays' data (tasks/vllm_kubernetes.py), a bastion with kubectl and a kubeconfig for the
# cluster the trays are nodes of; the trays then stop at the weights and the pod serves. Empty
# for the docker runtime (the GB200 default): with trays that run vllm.service themselves, the
# control host refuses to render objects for them. Switching to kubernetes, use:
#     k8s_control = _k8s_control_example
_k8s_control_example = [
    ("k8s-control-01", {"ssh_hostname": "198.51.100.3", "ssh_user": "root"}),
]
k8s_control = []

# One entry per machine: pyinfra would merge a repeated name, or deploy one address twice.
_refuse_duplicates(__file__, globals())

_fake = os.environ.get("GB200_FAKE")
if _fake:
    if _fake != "seed":
        raise SystemExit(f"GB200_FAKE={_fake!r}: the one fake tray known is 'seed'")
    _spec = importlib.util.spec_from_file_location(
        "seed_facts", Path(__file__).resolve().with_name("seed_facts.py"))
    _seed_facts = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_seed_facts)
    # GB200_FAKE_RUNTIME: the trays' vllm_runtime (unset: group_data/gb200.py's); kubernetes
    # also brings in the example control host.
    _runtime = os.environ.get("GB200_FAKE_RUNTIME")
    _data = {"vllm_runtime": _runtime} if _runtime else {}
    if _runtime == "kubernetes" and not k8s_control:
        k8s_control = _k8s_control_example
    gb200 = _seed_facts.fake_hosts(gb200, _seed_facts.fake_responses(), _data)
    drift_control = _seed_facts.fake_hosts(drift_control, None, _data)
    k8s_control = _seed_facts.fake_hosts(k8s_control, None, _data)
