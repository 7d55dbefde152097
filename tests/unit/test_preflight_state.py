"""tasks.facts.PreflightState: the preflight's six questions in one command give, on a real shell,
the values the six separate facts give: the same lines per section, the same parse, the same
defaults when a tool or a folder is missing, the same failure when ``uname -m`` fails.

Both sides run for real: in ``sh`` (what pyinfra runs) and ``bash``, then through pyinfra's own
@local connector. A missing tool is a PATH without it; no output is made up.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
from pyinfra.api import Config, Inventory, State, StringCommand
from pyinfra.api.connect import connect_all
from pyinfra.context import ctx_host, ctx_state
from pyinfra.facts.server import Command

from tasks import facts
from tasks.facts import PreflightState
from tasks.preflight import HostFacts, gather
from tasks.settings import UNIT_NAME, read_settings
from tests.helpers import FakeHost, group_data

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "facts"
SHELLS = ["sh", "bash"]
# Every tool the six commands run; a PATH of links to these, less some, is a host without them.
TOOLS = ("systemctl", "du", "cut", "dirname", "df", "ss", "uname", "python3")


def separate(unit: str, model_dir: str, weights_dir: str) -> dict[str, tuple[type, str]]:
    """Section -> (fact, command) as the preflight asked them one by one (the two Command
    facts with the path now quoted: the same string for any path without shell syntax)."""
    def raw(command):
        return command.get_raw_value() if isinstance(command, StringCommand) else command
    return {
        "service_pid": (Command, f"systemctl show -p MainPID --value {unit} 2>/dev/null || true"),
        "model_bytes": (Command, f"du -sb {shlex.quote(model_dir)} 2>/dev/null | cut -f1 || true"),
        "python": (facts.PythonVersion, raw(facts.PythonVersion().command())),
        "weights_free": (facts.FreeBytes, raw(facts.FreeBytes().command(weights_dir))),
        "listening": (facts.ListeningTcpPorts, raw(facts.ListeningTcpPorts().command())),
        "arch": (facts.CpuArchitecture, raw(facts.CpuArchitecture().command())),
    }


def run(shell: str, command: str, path: str | None = None) -> tuple[int, list[str]]:
    """Exit status and stdout lines, read as pyinfra reads them."""
    env = {**os.environ, "PATH": path} if path else None
    result = subprocess.run([shutil.which(shell), "-c", command], capture_output=True,
                            text=True, env=env, timeout=60)
    return result.returncode, result.stdout.splitlines()


def as_pyinfra(fact: type, status: int, lines: list[str]):
    """What pyinfra's get_fact hands out: process() of non-empty output of a command that
    succeeded, else the default (a failed command also fails the host)."""
    return fact().process(lines) if status == 0 and lines else fact.default()


def both_ways(shell: str, model_dir: str, weights_dir: str, path: str | None = None):
    """(merged status, merged value, separate statuses, separate values), all run for real.
    The merged command prints exactly the separate commands' lines, each in its section. Run
    again (3 tries) if the host moved in between: another test opened a port."""
    for _ in range(3):
        status, lines = run(shell, PreflightState().command(
            unit=UNIT_NAME, model_dir=model_dir, weights_dir=weights_dir), path)
        statuses, values, printed = {}, {}, {}
        for name, (fact, command) in separate(UNIT_NAME, model_dir, weights_dir).items():
            statuses[name], printed[name] = run(shell, command, path)
            values[name] = as_pyinfra(fact, statuses[name], printed[name])
        if steady_lines(lines) == steady_lines(PreflightState.output_of(printed)):
            return status, steady(as_pyinfra(PreflightState, status, lines)), statuses, \
                steady(values)
    raise AssertionError(f"{lines} != {PreflightState.output_of(printed)}")


def steady_lines(lines: list[str]) -> list[str]:
    """Lines less the byte counts of df, which other processes move while the tests run."""
    return [re.sub(r"\d{7,}", "#", line) for line in lines]


def steady(value: dict) -> dict:
    """A PreflightState value less free_bytes, which other processes move while tests run."""
    free = {key: item for key, item in value["weights_free"].items() if key != "free_bytes"}
    return {**value, "weights_free": free}


def path_without(folder: Path, *missing: str) -> str:
    """A PATH holding the tools this machine has, less ``missing``."""
    folder.mkdir(exist_ok=True)
    for tool in TOOLS:
        found = shutil.which(tool)
        if tool not in missing and found:
            (folder / tool).symlink_to(found)
    return str(folder)


@pytest.fixture
def model_dir(tmp_path) -> Path:
    folder = tmp_path / "models" / "tiny"
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"\0" * 123456)
    return folder


@pytest.mark.parametrize("shell", SHELLS)
def test_on_this_machine_each_answer_is_the_separate_facts(shell, model_dir, tmp_path):
    status, merged, statuses, separate_values = both_ways(
        shell, str(model_dir), str(tmp_path / "models" / "not-yet"))
    assert status == 0 and set(statuses.values()) == {0}
    assert merged == separate_values
    assert int(merged["model_bytes"]) >= 123456
    assert merged["weights_free"]["path"] == str(tmp_path / "models")
    assert merged["arch"] == os.uname().machine


@pytest.mark.parametrize("shell", SHELLS)
def test_a_missing_model_folder_reads_as_nothing_present(shell, tmp_path):
    _, merged, _, separate_values = both_ways(shell, str(tmp_path / "absent"), str(tmp_path))
    assert merged == separate_values
    assert merged["model_bytes"] is None


@pytest.mark.parametrize("shell", SHELLS)
@pytest.mark.parametrize("missing,section,empty", [
    ("python3", "python", None), ("ss", "listening", []), ("systemctl", "service_pid", None),
    ("df", "weights_free", {}), ("du", "model_bytes", None)])
def test_a_host_without_a_tool_gets_that_facts_default(shell, missing, section, empty,
                                                       model_dir, tmp_path):
    path = path_without(tmp_path / "bin", missing)
    status, merged, _, separate_values = both_ways(shell, str(model_dir), str(tmp_path), path)
    assert status == 0
    assert merged == separate_values
    assert merged[section] == empty
    assert merged["arch"] == os.uname().machine


@pytest.mark.parametrize("shell", SHELLS)
def test_a_host_whose_uname_fails_fails_the_fact_as_cpu_architecture_did(shell, model_dir,
                                                                         tmp_path):
    path = path_without(tmp_path / "bin", "uname")
    (tmp_path / "bin" / "uname").write_text("#!/bin/sh\necho 'uname: broken' >&2\nexit 3\n")
    (tmp_path / "bin" / "uname").chmod(0o755)
    status, merged, statuses, _ = both_ways(shell, str(model_dir), str(tmp_path), path)
    assert status == statuses["arch"] == 3
    assert merged == steady(PreflightState.default())


@pytest.mark.parametrize("shell", SHELLS)
def test_paths_with_shell_syntax_are_paths(shell, tmp_path):
    odd = tmp_path / "it's a $(touch pwned) `touch pwned2`; dir"
    odd.mkdir()
    (odd / "weights").write_bytes(b"\0" * 5000)
    _, merged, _, separate_values = both_ways(shell, str(odd), str(odd / "sub"))
    assert merged == separate_values
    assert int(merged["model_bytes"]) >= 5000
    assert merged["weights_free"]["path"] == str(odd)
    assert not list(Path.cwd().glob("pwned*")) and not list(tmp_path.glob("pwned*"))


def test_no_output_is_the_default_of_every_section():
    assert PreflightState().process([]) == PreflightState.default() == {
        "service_pid": None, "model_bytes": None, "python": None, "weights_free": {},
        "listening": [], "arch": None}


def fixture_cases(fact: str) -> list[dict]:
    return [json.loads(path.read_text()) for path in sorted((FIXTURES / fact).glob("*.json"))]


@pytest.mark.parametrize("section,fact", [("python", "PythonVersion"),
                                          ("weights_free", "FreeBytes"),
                                          ("listening", "ListeningTcpPorts"),
                                          ("arch", "CpuArchitecture")])
def test_every_captured_fact_case_reads_the_same_in_its_section(section, fact):
    """The real captures of tests/fixtures/facts, each in its section among the others'."""
    for case in fixture_cases(fact):
        output = case["output"] if "output" in case else \
            (FIXTURES.parent / case["output_file"]).read_text().splitlines()
        for before in ([], ["4242"]):
            answers = {"service_pid": before, "model_bytes": before, section: output}
            read = PreflightState().process(PreflightState.output_of(answers))
            assert read[section] == case["fact"], case
            assert read["service_pid"] == ("4242" if before else None)


def test_a_section_ending_without_a_newline_or_with_empty_lines_keeps_its_lines():
    # "a" then the next mark's "\n": no empty line to drop; "a\n\n" keeps its own empty line.
    assert PreflightState()._sections(["", "::preflight-state::python", "a",
                                       "::preflight-state::arch", "x"]) == {
        "python": ["a"], "arch": ["x"]}
    assert PreflightState()._sections(["", "::preflight-state::python", "a", "", "",
                                       "::preflight-state::arch", "x", ""]) == {
        "python": ["a", ""], "arch": ["x", ""]}


# ---- through pyinfra: the @local connector, and the preflight's gather -----------------------

@pytest.fixture(scope="module")
def local_host():
    inventory = Inventory((["@local"], {}))
    state = State(inventory, Config())
    connect_all(state)
    return inventory.get_host("@local")


def test_gather_reads_what_the_separate_facts_read(local_host, controller_folders, model_dir):
    data = {**group_data("sandbox"), **controller_folders,
            "weights_dir": str(model_dir.parent), "vllm_accept_open_endpoint": True}
    settings = dataclasses.replace(read_settings(FakeHost("local", data)),
                                   model_dir=str(model_dir))
    for _ in range(3):  # again if another test opened a port in between
        with ctx_state.use(local_host.state), ctx_host.use(local_host):
            gathered = gather(settings)
        if steady_facts(gathered) == steady_facts(asked_one_by_one(local_host, settings)):
            break
    else:
        assert steady_facts(gathered) == steady_facts(asked_one_by_one(local_host, settings))
    assert gathered.weights_present_bytes >= 123456
    assert gathered.arch == os.uname().machine and gathered.weights_free["free_bytes"] > 0
    assert local_host.state.failed_hosts == set()


def asked_one_by_one(local_host, settings) -> HostFacts:
    """HostFacts as the preflight gathered them before PreflightState: six facts."""
    pid = local_host.get_fact(Command, command=f"systemctl show -p MainPID --value {UNIT_NAME} "
                                               "2>/dev/null || true")
    present = local_host.get_fact(Command, command=f"du -sb {settings.model_dir} 2>/dev/null "
                                                   "| cut -f1 || true")
    return HostFacts(
        arch=local_host.get_fact(facts.CpuArchitecture),
        python=local_host.get_fact(facts.PythonVersion),
        weights_free=local_host.get_fact(facts.FreeBytes, path=settings.weights_dir),
        weights_present_bytes=int(present or 0),
        listening=local_host.get_fact(facts.ListeningTcpPorts),
        service_pid=int(pid) if pid and pid != "0" else None)


def steady_facts(host_facts: HostFacts) -> HostFacts:
    free = {key: item for key, item in host_facts.weights_free.items() if key != "free_bytes"}
    return dataclasses.replace(host_facts, weights_free=free)


def test_the_preflight_also_asks_what_the_next_steps_read_and_the_folders_on_wrong_data(
        tmp_path):
    # Imported here: the Hub path's modules, as tasks.preflight imports them.
    from tasks import hf_cli, system, weights
    from tasks.preflight import next_steps_facts
    from tests.unit.test_weights import hub_settings

    wheelhouse = tmp_path / "hf-wheelhouse"
    wheelhouse.mkdir()
    data = {**group_data("sandbox"), "hf_cli_wheelhouse_dir": str(wheelhouse),
            "vllm_accept_open_endpoint": True}
    settings = read_settings(FakeHost("local", data))
    hub = hub_settings(verify_schedule=None)
    folders = [weights.tree_fact(target) for target in weights.targets(settings, hub)]
    local = Inventory((["@local"], data)).get_host("@local")
    with ctx_host.use(local):
        # A wheelhouse without its lock: the hf CLI's data is wrong, which the preflight
        # reports (tasks.preflight._problems); the weights folders it reads are still asked.
        assert next_steps_facts(settings, hub) == [*system.facts_read(settings), *folders]
        (wheelhouse / "requirements.lock").write_text(
            f"huggingface-hub=={data['hf_cli_version']} \\\n")
        wanted = next_steps_facts(settings, hub)
        assert wanted == [*system.facts_read(settings), *weights.facts_read(settings, hub)]
        assert all(fact in wanted for fact in [*hf_cli.facts_read("@local", local.data),
                                               *folders])
        # The push path: the system step's and the pushed folder's.
        assert next_steps_facts(settings, None) == [*system.facts_read(settings),
                                                    *weights.facts_read(settings, None)]
