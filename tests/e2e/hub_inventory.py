"""inventories/sandbox.py's hosts, fetching the model from hub-mirror instead of pushing it.

Each host reaches the mirror on its own controller address (HUB_E2E_PORTS: {"host": port});
HUB_E2E_DATA (JSON) adds or overrides host data for one run (weights_dir, watchdog, ...).
"""

import json
import os
import runpy
from pathlib import Path

_sandbox = runpy.run_path(str(Path(__file__).resolve().parents[2] / "inventories" / "sandbox.py"))
_state = json.loads((Path(_sandbox["_state_file"])).read_text())
_addresses = {h["name"]: h["controller_address"] for h in _state["hosts"]}
_ports = json.loads(os.environ.get("HUB_E2E_PORTS", "{}"))
_extra = json.loads(os.environ.get("HUB_E2E_DATA", "{}"))

sandbox = [
    (name, {**data, "model_source_dir": None,
            "weights_hf_endpoint": f"http://{_addresses[name]}:{_ports.get(name, 9)}",
            "weights_hf_token_file": os.environ.get("HUB_E2E_TOKEN_FILE"),
            **_extra})
    for name, data in _sandbox["sandbox"]
]
