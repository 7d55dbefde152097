"""Facts asked together: the facts a step's operations will read, asked of a host in one
command before the operations ask them one by one (installed from config.py).

pyinfra 3 caches no fact and runs one command per fact. A no-op run of preflight, system and
weights asked each host 14 of them; every command is an SSH channel, a login shell on the host
and a round trip, and on 8 sandbox hosts those were half of the machine's CPU (README, fleet
figures). ``ask_together`` runs the facts' own commands in one shell, each in a subshell
followed by its exit status, and reads each answer with its own fact's ``process()``, as
pyinfra would; File, Directory and Link facts (a step reads a dozen) share one ``stat``, each
answer the line File's own command would have printed (``stat_command``). ``host.get_fact``
then gives that answer for the same fact with the same arguments:

- until an operation runs a command on that host (a shell command, an upload, a Python
  callback: anything that may change it); after that, every fact is asked afresh. Until this
  run has changed the host, an answer read at the start of a step is what pyinfra would read
  when the operation runs (with -y it reads an operation's facts then; a host changing on its
  own meanwhile, a fetch unit still running, races pyinfra's own reads as much);
- when a plan is shown first (no -y), to the plan only: once operations run, they ask afresh;
- only to a fact that would run as the batch ran (the same sudo, su, environment ...).

A fact with a precondition or a shell of its own is asked alone, as is one whose command
failed (pyinfra fails the host, or ignores it if the operation says so), whose program is not
installed (pyinfra tells that from an empty answer) or whose output its ``process()``
rejects, and every one when the batch itself could not run. A step that lists a fact its
operations no longer ask pays a few lines of output; an operation that asks a fact nobody
listed asks it itself: a wrong list is slower, never wrong. tests/unit/test_facts_together.py
compares each answer with pyinfra's own; the Hub e2e counts a no-op run's commands.
"""

from __future__ import annotations

from functools import cache
from inspect import Signature, signature
from typing import Any, Iterable

from pyinfra import logger
from pyinfra.api import host as pyinfra_host
from pyinfra.api.arguments import CONNECTOR_ARGUMENT_KEYS
from pyinfra.api.command import PyinfraCommand, QuoteString, StringCommand
from pyinfra.api.facts import (_MISSING_COMMAND_MARKER, FactBase, ShortFactBase,
                               _handle_fact_kwargs, _make_command)
from pyinfra.api.state import StateStage
from pyinfra.facts.files import LINUX_STAT_COMMAND, File, Sha1File
from pyinfra.facts.systemd import SystemdEnabled, SystemdStatus

from tasks.facts import marked_sections

MARK = "::asked-together::"
STATUS = "::asked-together-status::"
STAT_MARK = "::stat::"  # starts each line of the one stat that answers File facts together
_ANSWERS = "_facts_asked_together"  # Host attribute: {key: (executor arguments, answer)}

Wanted = tuple[type[FactBase], dict[str, Any]]


def written_file(path: str, digest: type[FactBase] = Sha1File) -> list[Wanted]:
    """What an operation that writes ``path`` reads of it: files.put and files.template its
    stat and sha1; secret_file_present (``digest`` Sha256File) its stat and sha256."""
    return [(File, {"path": path}), (digest, {"path": path})]


def service(unit: str) -> list[Wanted]:
    """What systemd.service reads of ``unit``: whether it runs, whether it is enabled."""
    return [(SystemdStatus, {"services": [unit]}), (SystemdEnabled, {"services": [unit]})]


@cache
def _command_signature(cls: type) -> Signature:
    # A fact's command() takes the same arguments all run: read once (getcallargs reads the
    # signature again on every call, ~1 ms a host in a no-op run).
    return signature(cls().command)


def _key(cls: type, args: tuple, kwargs: dict) -> tuple | None:
    """What identifies one asking of a fact: its class and its arguments as pyinfra binds
    them (defaults filled in); None when the call carries global arguments (_sudo=...)."""
    if any(name.startswith("_") for name in kwargs):
        return None
    bound: dict = {}
    if args or kwargs:
        try:
            arguments = _command_signature(cls).bind(*args, **kwargs)
        except (TypeError, ValueError):  # wrong arguments: pyinfra says so when it asks
            return None
        arguments.apply_defaults()
        bound = arguments.arguments
    return cls, tuple(sorted((name, repr(value)) for name, value in bound.items()))


def _executor_arguments(state, host, cls: type, kwargs: dict) -> dict:
    """How pyinfra would run this fact's command now (sudo, su, env, shell ...)."""
    _, global_arguments = _handle_fact_kwargs(state, host, cls, None, kwargs)
    return {key: global_arguments[key] for key in CONNECTOR_ARGUMENT_KEYS
            if key in global_arguments}


def _batchable(cls: type) -> bool:
    return (not issubclass(cls, ShortFactBase) and not cls().shell_executable
            and cls.check_preconditions is FactBase.check_preconditions)


def _command(fact: FactBase, kwargs: dict) -> str | StringCommand:
    """The fact's command as pyinfra runs it: one that requires a program prints pyinfra's
    marker instead when the program is not there. (Some facts keep their arguments on the
    instance for process(): the same instance must read the answer.)"""
    command = _make_command(fact.command, kwargs)
    required = _make_command(fact.requires_command, kwargs)
    if not required:
        return command
    return StringCommand("if", "command", "-v", required, ">/dev/null", "2>&1;", "then", "(",
                         command, ");", "else", "echo", f"'{_MISSING_COMMAND_MARKER}';", "fi")


def batch_command(commands: list[str | StringCommand]) -> StringCommand:
    """One shell command: each of ``commands`` in a subshell, its output after a mark line and
    followed by its exit status (both on lines of their own)."""
    pieces: list[Any] = []
    for index, command in enumerate(commands):
        pieces += [f"printf '\\n%s\\n' {MARK}{index};", "(", command, ")", "2>/dev/null;",
                   f"printf '\\n{STATUS}%s\\n' $?;"]
    return StringCommand(*pieces)


def batch_answers(output: list[str], count: int) -> list[tuple[int, list[str]] | None]:
    """Each command's (exit status, output lines, as its command alone prints them) from the
    batch's output, None for one whose status line is missing. The empty line each printf
    starts with is not the command's: a last line that ended with a newline leaves one."""
    sections = marked_sections(output, MARK)
    answers: list[tuple[int, list[str]] | None] = []
    for index in range(count):
        lines = sections.get(str(index), [])
        ends = [number for number, line in enumerate(lines) if line.startswith(STATUS)]
        status = lines[ends[-1]][len(STATUS):] if ends else ""
        if not status.isdigit():
            answers.append(None)
            continue
        printed = lines[:ends[-1]]
        if printed[-1:] == [""]:
            printed.pop()
        answers.append((int(status), printed))
    return answers


def stat_path(cls: type, kwargs: dict) -> str | None:
    """The path of a fact pyinfra answers with File's own stat command (File, Directory, Link
    ...), None for any other fact (and for a path under ``~/``, which the shell expands)."""
    path = kwargs.get("path")
    if not (issubclass(cls, File) and cls.command is File.command and isinstance(path, str)):
        return None
    return None if path.startswith("~/") else path


def stat_command(paths: list[str]) -> StringCommand:
    """One command for File's stat of every path of ``paths``: per path a line ``+`` (there,
    as File's ``test -e || test -L`` says) or ``-``, then one ``stat`` of those there, its line
    for each (File's own format) after STAT_MARK, in order. Nine paths cost a tray's shell one
    program instead of nine, and ~27 processes fewer (File's subshells)."""
    stat = LINUX_STAT_COMMAND.replace("stat -c '", f"stat -c '{STAT_MARK}", 1)
    return StringCommand("set --;", "for", "p", "in", *(QuoteString(path) for path in paths),
                         "; do if test -e \"$p\" || test -L \"$p\"; then set -- \"$@\" \"$p\";",
                         "echo +; else echo -; fi; done;", "[ $# = 0 ] ||", stat, '-- "$@"')


def stat_answers(lines: list[str], count: int) -> list[list[str]] | None:
    """Each path's lines as File's command alone prints them (its stat line, or none for a
    path that is not there), from stat_command's output for ``count`` paths; None when the
    output is not that (no GNU stat, a stat that failed, a file name with a new line)."""
    flags, stats = lines[:count], lines[count:]
    if len(flags) != count or set(flags) - {"+", "-"} or flags.count("+") != len(stats) \
            or not all(line.startswith(STAT_MARK) for line in stats):
        return None
    found = iter(line[len(STAT_MARK):] for line in stats)
    return [[next(found)] if flag == "+" else [] for flag in flags]


def _run_batch(host, asked: list, instances: list, executor: dict) -> dict | None:
    """Run ``asked``'s commands as one on ``host``: {index in asked: (exit status, lines)} for
    each command that answered, None when the batch could not run. Two or more File stats are
    one command (stat_command), answered as each alone would have been."""
    stats = {index: path for index, (_, cls, kwargs) in enumerate(asked)
             if (path := stat_path(cls, kwargs)) is not None}
    grouped = stats if len(stats) > 1 else {}  # index in asked -> path, for one stat
    alone = [index for index in range(len(asked)) if index not in grouped]
    commands = [_command(instances[index], asked[index][2]) for index in alone]
    if grouped:
        commands.append(stat_command(list(grouped.values())))
    try:
        ran, output = host.run_shell_command(batch_command(commands), print_output=False,
                                             print_input=False, **executor)
    except Exception as error:  # asked alone later, where pyinfra reports it as usual
        logger.debug(f"{host.name}: facts asked together failed ({error}); asking each alone")
        return None
    if not ran:
        return None
    answers = batch_answers(output.stdout_lines, len(commands))
    answered = {index: answer for index, answer in zip(alone, answers) if answer is not None}
    if grouped and answers[-1] is not None and answers[-1][0] == 0:
        for index, lines in zip(grouped, stat_answers(answers[-1][1], len(grouped)) or []):
            answered[index] = (0, lines)
    return answered


def ask_together(host, wanted: Iterable[Wanted]) -> int:
    """Ask ``host`` the ``wanted`` facts (class, keyword arguments) in one command, while the
    run is being prepared; their answers wait for the operations that ask them. Returns how
    many answers wait."""
    state = host.state
    if state is None or state.current_stage != StateStage.Prepare:
        return 0
    waiting = getattr(host, _ANSWERS, {})
    executor = None
    asked: list[tuple[tuple, type, dict]] = []
    for cls, kwargs in wanted:
        key = _key(cls, (), kwargs)
        if key is None or not _batchable(cls) or key in {a[0] for a in asked}:
            continue
        if executor is None:
            executor = _executor_arguments(state, host, cls, kwargs)
        if key in waiting and waiting[key][0] == executor:
            continue  # answered since the host last changed: still the answer
        asked.append((key, cls, kwargs))
    if not asked:
        return len(waiting)
    if not host.connected:
        host.connect(reason="to ask facts together", raise_exceptions=True)
    instances = [cls() for _, cls, _ in asked]
    answered = _run_batch(host, asked, instances, executor)
    for index, (status, lines) in (answered or {}).items():
        if status != 0 or lines == [_MISSING_COMMAND_MARKER]:
            continue  # a failure, or "not installed yet": pyinfra's to report, asked alone
        try:
            value = instances[index].process(lines) if lines else instances[index].default()
        except Exception:  # pyinfra's to report (or fail on), asked alone
            continue
        waiting[asked[index][0]] = (executor, value)
    setattr(host, _ANSWERS, waiting)
    return len(waiting)


_get_fact = pyinfra_host.Host.get_fact  # pyinfra's own


def _get_fact_asked_together(self, name_or_cls, *args, **kwargs):
    waiting = getattr(self, _ANSWERS, None)
    if waiting:
        if self.state.current_stage != StateStage.Prepare and self.state.check_for_changes:
            waiting.clear()  # the plan was made with them; operations now read their own
        else:
            key = _key(name_or_cls, args, kwargs) if isinstance(name_or_cls, type) else None
            if key in waiting:
                executor, value = waiting[key]
                if executor == _executor_arguments(self.state, self, name_or_cls, kwargs):
                    return value
    return _get_fact(self, name_or_cls, *args, **kwargs)


def _forgetting(execute):
    """``execute`` of a command class, dropping the host's waiting answers first."""

    def execute_after_forgetting(self, state, host, connector_arguments):
        waiting = getattr(host, _ANSWERS, None)
        if waiting:
            waiting.clear()
        return execute(self, state, host, connector_arguments)

    execute_after_forgetting.forgets = True
    return execute_after_forgetting


def _command_classes(cls=PyinfraCommand):
    for subclass in cls.__subclasses__():
        yield subclass
        yield from _command_classes(subclass)


def install() -> None:
    pyinfra_host.Host.get_fact = _get_fact_asked_together
    for cls in {PyinfraCommand, *_command_classes()}:
        execute = cls.__dict__.get("execute")
        if execute is not None and not getattr(execute, "forgets", False):
            cls.execute = _forgetting(execute)
