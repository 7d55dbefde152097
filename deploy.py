"""The runbook: from a bare host to a healthy vLLM endpoint serving the configured model.

    pyinfra inventories/gb200.py deploy.py         # production trays
    pyinfra inventories/sandbox.py deploy.py       # disposable local hosts (sandbox)

Each step converges one concern and changes nothing that is already right; a second run of an
unchanged deploy yields zero changes and no restart. Hosts of group `drift_control` get the
scheduled drift check instead of a server; hosts of group `router` run vllm-router in front of
the serving hosts; hosts of group `k8s_control` apply the Kubernetes objects (vllm_runtime =
"kubernetes").
"""

from pyinfra import host

from tasks import (drift_control, nvidia, preflight, system, vllm_container, vllm_kubernetes,
                   vllm_router, vllm_service, vllm_venv, weights)
from tasks.inventory_check import serves
from tasks.operations import every_host_reached

checked = False
if "drift_control" in host.groups:
    # The control host: drift-check on a systemd timer, reporting to Prometheus.
    drift_control.install()
elif "k8s_control" not in host.groups:
    # 1. Refuse what cannot work (bad data, too few GPUs, no disk, port taken; on a router,
    #    its backends and wheelhouse): the first operation fails on every such host, and the
    #    run stops before any change anywhere.
    checked = preflight.check()

if checked and serves(host.groups):
    # 2. OS packages and the weights folder; if this run restarts vLLM, a mark saying so
    #    before anything it reads changes (a run killed before the restart leaves it, and the
    #    next run restarts vLLM).
    system.prepare()
    restart_due = vllm_service.mark_restart_due() if host.data.vllm_runtime != "kubernetes" \
        else None
    # 3. Model weights into <weights_dir>/<model>: pushed from the controller, or fetched from
    #    the Hub (the seed's `hf download ... --local-dir`) in a unit of their own, which runs
    #    on while step 4 installs the runtime.
    placing = weights.place()
    # 4. The runtime that runs `vllm serve`: the pinned image on Docker (with the NVIDIA
    #    toolkit on GPU hosts), or a venv built from a wheelhouse.
    if host.data.vllm_runtime == "docker":
        nvidia.prepare()
        runtime = vllm_container.install()
    elif host.data.vllm_runtime == "venv":
        runtime = vllm_venv.install()
    # 5. The weights complete (the fetch followed to its end), then vllm.service with the
    #    rendered command line; restart only if something above changed. Kubernetes nodes
    #    stop at the weights: the Deployment of step 6 runs vLLM there.
    model = weights.ready(placing)
    if host.data.vllm_runtime != "kubernetes":
        vllm_service.run(runtime=runtime, weights=model, restart_due=restart_due)

# pyinfra runs each operation on every host before the next, but orders two hosts' operations
# only where they share one: this one, which every host passes, puts what follows after
# every tray's steps above.
every_host_reached(name="Every tray deployed", step="every tray's steps 1-5")

# 6. kubernetes runtime: the seed's objects, rendered from the nodes' data, applied from the
#    k8s_control host, once every node holds the weights.
if "k8s_control" in host.groups:
    vllm_kubernetes.apply()

# 7. The router, once every tray serves: the deploy waits until it reports each one healthy.
if checked and "router" in host.groups:
    vllm_router.install()
