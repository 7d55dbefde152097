"""Shared test helpers: the repository's own data, loaded the way pyinfra loads it."""

from __future__ import annotations

from pyinfra.api import StringCommand
from pyinfra.context import ctx_host, ctx_state

# group_data is re-exported: tests read the data the way the commands read it.
from tools.repository import REPO, group_data  # noqa: F401

SEED = REPO.parent / "shared" / "seed" / "000_80ee62958af13de0.txt"
# The seed's section 6, kept in the repository: a clone without ../shared still has it.
SEED_BENCHMARKS = REPO / "tests" / "fixtures" / "seed-benchmarks.txt"


def seed_benchmarks_text() -> str:
    """The seed's benchmark section (command and results), from the fixture copy."""
    return "\n".join(line for line in SEED_BENCHMARKS.read_text().splitlines()
                     if not line.startswith("# ")) + "\n"


class FakeHost:
    """Just enough of pyinfra's Host for tasks.settings.read_settings: a name and a data mapping.
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


def fact_command(fact, **arguments) -> str:
    """The command a fact sends with these arguments, as the @fake connector matches it."""
    command = fact().command(**arguments)
    return command.get_raw_value() if isinstance(command, StringCommand) else command


def planned_commands(state, host, describe) -> dict[str, list]:
    """{operation name: its commands, each through ``describe``} for every operation that
    would change something on ``host``; the name without the deploy names before it."""
    planned = {}
    with ctx_state.use(state), ctx_host.use(host):
        for op_hash in state.get_op_order():
            commands = [describe(command) for command in
                        state.get_op_data_for_host(host, op_hash).command_generator()]
            if commands:
                (name,) = state.get_op_meta(op_hash).names
                planned[name.rsplit(" | ", 1)[-1]] = commands
    return planned
