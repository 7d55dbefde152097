"""The runbook: from a bare host to a healthy vLLM endpoint serving the configured model.

    pyinfra inventories/gb200.py deploy.py         # production trays
    pyinfra inventories/sandbox.py deploy.py       # disposable local hosts (tools/sandbox)

Each step converges one concern and changes nothing that is already right; a second run of an
unchanged deploy yields zero changes and no restart. Hosts of group `drift_control` get the
scheduled drift check instead of a server.
"""

from pyinfra import host

from tasks import drift_control, preflight, system, vllm_service, vllm_venv, weights

if "drift_control" in host.groups:
    # The control host: tools/drift-check on a systemd timer, reporting to Prometheus.
    drift_control.install()

# 1. Refuse what cannot work (bad data, too few GPUs, no disk, port taken): the first
#    operation fails on every such host, and the run stops before any change anywhere.
elif preflight.check():
    # 2. OS packages and the weights folder.
    system.prepare()
    # 3. Model weights into <weights_dir>/<model> (the seed's `hf download ... --local-dir`).
    model = weights.place()
    # 4. The runtime that runs `vllm serve`.
    runtime = vllm_venv.install()
    # 5. vllm.service with the rendered command line; restart only if something above changed.
    vllm_service.run(restart_triggers=[model, runtime])
