"""Shared test helpers: the repository's own data, loaded the way pyinfra loads it."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import runpy
import sys
import types
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SEED = REPO.parent / "shared" / "seed" / "000_80ee62958af13de0.txt"
# The seed's section 6, kept in the repository: a clone without ../shared still has it.
SEED_BENCHMARKS = REPO / "tests" / "fixtures" / "seed-benchmarks.txt"


def seed_benchmarks_text() -> str:
    """The seed's benchmark section (command and results), from the fixture copy."""
    return "\n".join(line for line in SEED_BENCHMARKS.read_text().splitlines()
                     if not line.startswith("# ")) + "\n"


def group_data(*groups: str) -> dict:
    """group_data/all.py, then each named group file on top, as pyinfra merges them."""
    data: dict = {}
    for group in ("all", *groups):
        values = runpy.run_path(str(REPO / "group_data" / f"{group}.py"))
        data.update({key: value for key, value in values.items()
                     if not key.startswith("_") and not isinstance(value, types.ModuleType)})
    return data


class FakeHost:
    """Just enough of pyinfra's Host for tasks.settings.resolve: a name and a data mapping.
    A stand-in for the object pyinfra builds from an inventory; no connection involved."""

    def __init__(self, name: str, data: dict):
        self.name = name
        self.data = data


def run_fact(testinfra_host, fact_class, *args):
    """Run one of tasks/facts.py's facts through a testinfra host: the same command and the
    same parser pyinfra uses, so checks and deploys agree on what a host looks like."""
    fact = fact_class()
    command = fact.command(*args)
    text = command.get_raw_value() if hasattr(command, "get_raw_value") else str(command)
    output = testinfra_host.check_output(text)
    return fact.process(output.splitlines()) if output else fact.default()


def load_tool(name: str):
    """Import tools/NAME (a script without .py) as a module, registered in sys.modules so
    that its dataclasses can look their module up by name."""
    module_name = name.replace("-", "_")
    loader = importlib.machinery.SourceFileLoader(module_name, str(REPO / "tools" / name))
    spec = importlib.util.spec_from_loader(loader.name, loader)
    module = importlib.util.module_from_spec(spec)
    sys.modules[loader.name] = module
    loader.exec_module(module)
    return module
