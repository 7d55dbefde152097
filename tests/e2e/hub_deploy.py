"""The runbook with the weights fetched from a Hub mirror (tests/e2e/test_h_weights_hub.py).

HUB_E2E_RUNBOOK=full runs deploy.py itself; otherwise only preflight, system and weights (the
vLLM venv and service are not what these tests are about, and cost minutes).
"""

import os
import runpy
from pathlib import Path

from tasks import preflight, system, weights

if os.environ.get("HUB_E2E_RUNBOOK") == "full":
    runpy.run_path(str(Path(__file__).resolve().parents[2] / "deploy.py"))
elif preflight.check():
    system.prepare()
    weights.ready(weights.place())
