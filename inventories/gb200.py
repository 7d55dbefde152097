"""Production example: GB200 compute trays (aarch64 Grace, 4 x Blackwell GPUs each).

    pyinfra inventories/gb200.py deploy.py

Replace the placeholder addresses (TEST-NET-2, never routable) with your trays'. Per-machine
facts only; shared settings live in group_data/gb200.py and group_data/all.py.

The whole plan for these hosts with no machine (every host below as a pyinfra @fake host, the
trays answering as the seed's GB200 tray): `gb200-dry-run` (harness/gb200_fake_inventory.py).
"""

from tasks.inventory_check import refuse_duplicates as _refuse_duplicates

gb200 = [
    # (name, {connection and per-machine data})
    ("gb200-tray-01", {"ssh_hostname": "198.51.100.11", "ssh_user": "root"}),
    ("gb200-tray-02", {"ssh_hostname": "198.51.100.12", "ssh_user": "root"}),
]

# vllm-router: the one endpoint clients use, in front of every tray above (tasks/vllm_router.py).
# Here a Grace host like the trays (Ubuntu 24.04, aarch64), so its wheelhouse is built for
# that: router-wheelhouse --arch aarch64 --python-version 3.12 --out .cache/router-wheelhouse-gb200
# It listens on loopback unless router_host says otherwise, with router_accept_open_admin =
# True once the network lets only clients and the deploy reach its port. Empty for the
# kubernetes runtime: the Service is the endpoint there.
router = [
    ("gb200-router-01", {"ssh_hostname": "198.51.100.4", "ssh_user": "root",
                         "router_wheelhouse_dir": ".cache/router-wheelhouse-gb200"}),
]

# The host that runs the drift check on a timer (drift-check, tasks/drift_control.py):
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

