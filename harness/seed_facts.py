"""What the seed's GB200 tray answers to the deploy's facts, for pyinfra's ``@fake`` connector.

    pyinfra harness/gb200_fake_inventory.py deploy.py --dry     (gb200-dry-run)

Built from the fact fixture cases in tests/fixtures/facts/ (each holds the exact command a
fact sends and what the host printed), so the dry run, the fact tests and the preflight tests
read one description of the tray. A command no case answers gets the connector's default,
success with no output: a bare host, which is what a first deploy sees (no Docker, no
packages, no weights, nothing listening).

Not an inventory (pyinfra would read a module-level list as a host group):
harness/gb200_fake_inventory.py imports it under a leading underscore.
"""

from __future__ import annotations

import json
import shlex

from tasks.facts import PreflightState
from tools.repository import REPO

FIXTURES = REPO / "tests" / "fixtures"

# (fact, case, any_argument): the seed's 4 x GB200 tray (aarch64 Grace, 580 driver, fabric
# Completed, /raid with 3.8 TB free, Ubuntu 24.04's systemd and Python 3.12, Docker without
# the vLLM image).
# any_argument: the answer holds for every argument value (FreeBytes is asked for weights_dir
# and each model folder under it; the case's own path is one of those).
SEED_GB200_TRAY = (
    ("CpuArchitecture", "aarch64", False),
    ("NvidiaGpus", "gb200-4gpu-synthesized", False),
    ("NvidiaPciGpus", "gb200-4gpu-synthesized", False),
    ("NvidiaSmiInfo", "gb200-4gpu-synthesized", False),
    ("FreeBytes", "weights-dir-on-raid", True),
    ("SystemdVersion", "ubuntu2404", False),
    ("PythonVersion", "ubuntu2404", False),
    ("DockerImage", "absent", False),
)


def load_case(fact: str, case: str) -> dict:
    """One fixture case, with ``output`` read from ``output_file`` when the case names one."""
    found = json.loads((FIXTURES / "facts" / fact / f"{case}.json").read_text())
    if "output_file" in found:
        found["output"] = (FIXTURES / found["output_file"]).read_text().splitlines()
    return found


def command_key(case: dict, any_argument: bool) -> str:
    """The substring of a fact's command the connector matches: the whole command, or with
    ``any_argument`` the longest part of it that holds no argument value (as the shell sees
    it, quoted), so the same fact asked about another path matches too."""
    command = case["command"]
    if not any_argument or not case.get("arg"):
        return command
    pieces = [command]
    for value in case["arg"].values():
        pieces = [part for piece in pieces for part in piece.split(shlex.quote(str(value)))]
    return max(pieces, key=len).strip()


def fake_responses(cases=SEED_GB200_TRAY) -> dict[str, list[str]]:
    """``fake_responses`` host data: fact command (substring) -> the lines the host printed."""
    responses: dict[str, list[str]] = {}
    printed: dict[str, list[str]] = {}
    for fact, name, any_argument in cases:
        case = load_case(fact, name)
        responses[command_key(case, any_argument)] = list(case["output"])
        printed[fact] = list(case["output"])
    # The preflight asks several of these facts in one command, which holds their commands:
    # its answer comes first (the connector takes the first key found in a command).
    preflight = PreflightState.output_of({section: printed[fact.__name__] for section, fact
                                          in PreflightState.FACTS.items()
                                          if fact.__name__ in printed})
    return {PreflightState.MARK: preflight, **responses}


def fake_hosts(hosts: list[tuple[str, dict]], responses: dict | None,
               data: dict | None = None) -> list[tuple[str, dict]]:
    """The same hosts on the ``@fake`` connector: ``@fake/<name>``, no SSH data, instant
    commands, answering ``responses`` (None: a bare host that answers nothing), with ``data``
    on top of their own."""
    faked = []
    for name, own in hosts:
        kept = {key: value for key, value in own.items() if not key.startswith("ssh_")}
        faked.append((f"@fake/{name}", {**kept, **(data or {}),
                                        "fake_responses": dict(responses or {}),
                                        "fake_delay": 0, "fake_delay_jitter": 0}))
    return faked
