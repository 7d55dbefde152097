"""tasks/facts_together.py on this machine's real shell (pyinfra's @local connector): each
answer asked together is the answer pyinfra gives when asked alone, handed out once, only
while the run is prepared, and only to a fact asked the way the batch ran it."""

from __future__ import annotations

import os

import pytest
from pyinfra.api import Config, Inventory, State, StringCommand
from pyinfra.api.connect import connect_all
from pyinfra.api.facts import get_fact
from pyinfra.api.state import StateStage
from pyinfra.facts.deb import DebPackages
from pyinfra.facts.files import Directory, File, FindFiles, Link, Sha1File, Sha256File
from pyinfra.facts.server import Command

from tasks import facts, facts_together


@pytest.fixture
def local(tmp_path):
    """A connected @local host of a run being prepared, with the patch installed, and a
    folder of things to ask about; the patch removed afterwards."""
    inventory = Inventory((["@local"], {}))
    state = State(inventory, Config())
    connect_all(state)
    state.current_stage = StateStage.Prepare
    host = inventory.get_host("@local")
    (tmp_path / "file").write_text("some text\n")
    (tmp_path / "empty").write_text("")
    os.symlink(tmp_path / "file", tmp_path / "link")
    os.symlink(tmp_path / "gone", tmp_path / "dangling")
    (tmp_path / "it's spaced").write_text("x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "unit-a.service").write_text("a")
    (tmp_path / "sub" / "unit-b.timer").write_text("b")
    for path in tmp_path.rglob("*"):  # read once: a first read moves atime (relatime), which
        if path.is_file():           # File answers, between one asking and the next
            path.read_bytes()
    original = facts_together._get_fact
    facts_together.install()
    commands = []
    run = host.run_shell_command

    def counted(command, **kwargs):
        commands.append(command)
        return run(command, **kwargs)

    host.run_shell_command = counted
    yield host, tmp_path, commands
    type(host).get_fact = original


def wanted(folder) -> list[tuple[type, dict]]:
    return [(File, {"path": f"{folder}/file"}), (File, {"path": f"{folder}/missing"}),
            (Sha1File, {"path": f"{folder}/file"}), (Sha256File, {"path": f"{folder}/empty"}),
            (Sha1File, {"path": f"{folder}/missing"}), (Directory, {"path": f"{folder}/sub"}),
            (Directory, {"path": f"{folder}/file"}), (Link, {"path": f"{folder}/link"}),
            (Link, {"path": f"{folder}/dangling"}), (File, {"path": f"{folder}/it's spaced"}),
            (Link, {"path": f"{folder}/file"}),
            (FindFiles, {"path": f"{folder}/sub", "maxdepth": 1, "fname": "unit-*"}),
            (FindFiles, {"path": f"{folder}/none", "maxdepth": 1, "fname": "unit-*"}),
            (Command, {"command": "printf 'no newline at the end'"}),
            (Command, {"command": "printf 'two\\nlines\\n'"}),
            (facts.TreeDigests, {"path": f"{folder}/sub"}), (DebPackages, {})]


def test_each_answer_is_pyinfras_own_and_one_command_asks_them_all(local):
    host, folder, commands = local
    alone = [get_fact(host.state, host, cls, kwargs=kwargs) for cls, kwargs in wanted(folder)]
    asked_alone = len(commands)
    assert facts_together.ask_together(host, wanted(folder)) == len(wanted(folder))
    assert len(commands) == asked_alone + 1
    together = [host.get_fact(cls, **kwargs) for cls, kwargs in wanted(folder)]
    assert len(commands) == asked_alone + 1  # every answer waited
    assert together == alone
    # The test would prove nothing if the answers were all empty.
    assert together[0]["size"] == 10 and together[1] is None and together[5]
    assert together[6] is False and together[7]["link_target"] == f"{folder}/file"
    assert together[8]["link_target"] == f"{folder}/gone" and together[9]["size"] == 1
    assert together[10] is False
    assert sorted(together[11]) == [f"{folder}/sub/unit-a.service", f"{folder}/sub/unit-b.timer"]
    assert together[13] == "no newline at the end" and together[14] == "two\nlines"
    assert "dpkg" in together[16] or "python3" in together[16]  # what this machine has
    # The eight File, Directory and Link facts were one stat, not File's command each.
    batch = str(commands[-1])
    assert batch.count(facts_together.STAT_MARK) == 1 and "stat -f" not in batch


def test_a_fact_whose_command_fails_is_left_to_pyinfra(local):
    """pyinfra fails the host when a fact's command fails (unless the operation ignores
    errors): the batch hands out no answer for it."""
    host, folder, commands = local
    assert facts_together.ask_together(host, [(Command, {"command": "echo out; exit 3"}),
                                             (File, {"path": f"{folder}/file"})]) == 1
    with pytest.raises(Exception, match="No hosts remaining|could not load fact"):
        host.get_fact(Command, command="echo out; exit 3")
    assert len(commands) == 2


@pytest.mark.parametrize("with_y", [False, True], ids=["while planning", "operations, -y"])
def test_an_answer_serves_every_asking_until_a_command_runs_on_the_host(local, with_y):
    """While pyinfra plans, and with -y (no plan: pyinfra reads an operation's facts when it
    runs it) while operations run."""
    host, folder, commands = local
    host.state.check_for_changes = not with_y
    facts_together.ask_together(host, [(File, {"path": f"{folder}/file"})])
    if with_y:
        host.state.current_stage = StateStage.Execute
    before = len(commands)
    assert host.get_fact(File, path=f"{folder}/file")["size"] == 10
    assert host.get_fact(File, path=f"{folder}/file")["size"] == 10
    assert len(commands) == before
    StringCommand("printf", "'longer text now\\n'", ">", f"{folder}/file").execute(
        host.state, host, {})
    assert host.get_fact(File, path=f"{folder}/file")["size"] == 16
    assert len(commands) == before + 2


def test_a_plan_made_first_gets_the_answers_and_the_operations_ask_afresh(local):
    """Without -y pyinfra plans (reading facts) before it runs: answers left then are old."""
    host, folder, commands = local
    facts_together.ask_together(host, [(File, {"path": f"{folder}/file"})])
    (folder / "file").write_text("changed by an operation\n")
    host.state.current_stage = StateStage.Execute
    assert host.get_fact(File, path=f"{folder}/file")["size"] == 24
    assert facts_together.ask_together(host, [(File, {"path": f"{folder}/file"})]) == 0


def test_a_fact_asked_with_other_arguments_or_another_environment_is_asked_itself(local):
    host, folder, commands = local
    facts_together.ask_together(host, [(FindFiles, {"path": f"{folder}/sub", "fname": "x*"}),
                                       (File, {"path": f"{folder}/file"})])
    before = len(commands)
    assert host.get_fact(FindFiles, path=f"{folder}/sub", fname="unit-a*") == [
        f"{folder}/sub/unit-a.service"]
    assert len(commands) == before + 1
    # The same fact with the same arguments, run with other global arguments (an operation's
    # _env): asked itself.
    host.get_fact(File, path=f"{folder}/file", _env={"LC_ALL": "C"})
    assert len(commands) == before + 2
    # Asked inside an operation that runs its commands with another environment: likewise.
    host.current_op_global_arguments = {"_env": {"LC_ALL": "C"}}
    host.get_fact(File, path=f"{folder}/file")
    assert len(commands) == before + 3
    # Asked as the batch ran it: the answer that waited, still there.
    host.current_op_global_arguments = None
    before = len(commands)
    assert host.get_fact(File, path=f"{folder}/file")["size"] == 10
    assert len(commands) == before


class NotInstalled(Command):
    def requires_command(self, command) -> str:
        return "no-such-program-here"


def test_a_fact_whose_program_is_not_installed_is_asked_alone(local):
    """pyinfra tells "not installed yet" (skipped while preparing, a warning when run) from
    an empty answer: the batch leaves that to it."""
    host, folder, commands = local
    assert facts_together.ask_together(host, [(NotInstalled, {"command": "true"}),
                                             (File, {"path": f"{folder}/file"})]) == 1
    assert len(commands) == 1
    assert host.get_fact(NotInstalled, command="true") is None
    assert len(commands) == 2


def test_batch_output_is_split_back_into_each_commands_lines():
    mark, status = facts_together.MARK, facts_together.STATUS
    output = ["", f"{mark}0", "a", "b", "", f"{status}0", "", f"{mark}1", "", f"{status}1",
              "", f"{mark}2", "no newline", f"{status}0", "", f"{mark}3", "cut short"]
    assert facts_together.batch_answers(output, 4) == [(0, ["a", "b"]), (1, []),
                                                       (0, ["no newline"]), None]


def test_where_the_one_stat_fails_each_file_fact_is_asked_alone(local, monkeypatch):
    """A host whose stat is not GNU's (or fails): the File facts wait for no answer, and
    pyinfra asks each with its own command and its own fallbacks."""
    host, folder, commands = local
    fake = folder / "bin"
    fake.mkdir()
    (fake / "stat").write_text("#!/bin/sh\nexit 1\n")
    (fake / "stat").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}:{os.environ['PATH']}")
    asked = [(File, {"path": f"{folder}/file"}), (Directory, {"path": f"{folder}/sub"}),
             (Sha1File, {"path": f"{folder}/file"})]
    assert facts_together.ask_together(host, asked) == 1  # the digest alone
    assert len(commands) == 1
    assert host.get_fact(File, path=f"{folder}/file")["size"] == 10  # from ls -ld
    assert len(commands) == 2


def test_one_stats_output_is_split_back_into_each_paths_line():
    mark = facts_together.STAT_MARK
    assert facts_together.stat_answers(["+", "-", "+", f"{mark}a", f"{mark}b"], 3) == [
        ["a"], [], ["b"]]
    assert facts_together.stat_answers(["-", "-"], 2) == [[], []]
    for lines, count in ((["+", "-"], 2),                  # stat printed nothing
                         (["+", "+", f"{mark}a"], 2),      # one stat line missing
                         (["+", f"{mark}a", "b"], 1),      # a name with a new line
                         (["+", "a"], 1),                   # not this stat's line
                         (["+"], 2)):                       # cut short
        assert facts_together.stat_answers(lines, count) is None, lines


def test_one_asking_has_one_key_however_its_arguments_are_written():
    """Positional or by name, defaults written out or left to the fact: one key, as pyinfra
    binds them; other arguments, another key; arguments the fact does not take, no key (pyinfra
    says so when it asks); global arguments, no key."""
    key = facts_together._key
    by_name = key(FindFiles, (), {"path": "/etc", "fname": "x*"})
    assert by_name is not None
    assert key(FindFiles, ("/etc",), {"fname": "x*"}) == by_name
    assert key(FindFiles, ("/etc",), {"fname": "x*", "quote_path": True}) == by_name
    assert key(FindFiles, ("/etc",), {"fname": "y*"}) != by_name
    assert key(File, ("/etc",), {}) == key(File, (), {"path": "/etc"}) != \
        key(Directory, (), {"path": "/etc"})
    assert key(File, (), {"path": "/etc", "colour": "red"}) is None
    assert key(File, ("/etc", "/var"), {}) is None
    assert key(File, (), {"path": "/etc", "_sudo": True}) is None
    assert key(Command, (), {}) == (Command, ())
