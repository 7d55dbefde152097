"""The hosts `sandbox up` booted on this machine (systemd-nspawn, private veth addresses).

    sandbox up 2 && pyinfra -y inventories/sandbox.py deploy.py
    sandbox up 3 --routers 1 && pyinfra -y inventories/sandbox.py deploy.py   # a fleet

SANDBOX_NAME picks the sandbox (default "sbx"; the tests use their own). SANDBOX_RUNTIME picks
how vLLM runs: venv (default) or docker (the image of vllm-image). Host keys are known
in advance (the sandbox wrote them), so host-key checking stays strict.
"""

import json
import os
from pathlib import Path

from tasks.inventory_check import refuse_duplicates as _refuse_duplicates

_state_dir = Path(os.environ.get("SANDBOX_STATE_DIR", Path(__file__).resolve().parent.parent / ".sandbox"))
_state_file = _state_dir / os.environ.get("SANDBOX_NAME", "sbx") / "hosts.json"
if not _state_file.exists():
    raise SystemExit(f"no sandbox at {_state_file}: run `sandbox up` first")
_state = json.loads(_state_file.read_text())

def _connection(host: dict) -> dict:
    return {
        "ssh_hostname": host["address"],
        "ssh_user": "root",
        "ssh_key": _state["ssh_key"],
        "ssh_known_hosts_file": _state["known_hosts"],
        "ssh_strict_host_key_checking": "yes",
        # The key clients send: the serving hosts require it, the checks through a router too.
        "vllm_api_key_file": _state["api_key_file"],
    }


sandbox = [
    (
        host["name"],
        {
            **_connection(host),
            # Hosts share this machine's CPUs: each pins vLLM's threads to its own.
            "vllm_cpu_threads_bind": str(host["cpu"]),
            "vllm_runtime": os.environ.get("SANDBOX_RUNTIME", "venv"),
        },
    )
    for host in _state["hosts"] if host.get("role", "serve") == "serve"
]

# `sandbox up N --routers 1`: vllm-router in front of the hosts above, on its veth address,
# which only this machine and the sandbox's hosts reach (so its open admin routes are fine).
router = [
    (host["name"], {**_connection(host), "router_host": host["address"],
                    "router_accept_open_admin": True})
    for host in _state["hosts"] if host.get("role") == "router"
]

# One entry per machine: pyinfra would merge a repeated name, or deploy one address twice.
_refuse_duplicates(__file__, globals())
