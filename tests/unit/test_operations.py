"""Every custom pyinfra operation of tasks/, driven through cases written as data.

The format and the runner follow pyinfra's own operation tests (pyinfra-dev/pyinfra:
tests/operations/<module.op>/<case>.json and tests/test_operations.py): one JSON file per
case holds the operation's arguments, what each fact it asks returns, and the exact commands
it must yield. Each case lives at

    tests/fixtures/operations/<python module>.<operation>/<case>.json
    e.g. tests/fixtures/operations/tasks.operations.secret_file_present/unchanged.json

with these keys (every one but "description" and "commands" may be left out; this one shows
them all at once and is no real case: read e.g. tasks.operations.secret_file_present/absent.json):

    {
        "description": "One line: what an SRE can rely on, shown by this case.",
        "args": ["/raid/models/tiny"],
        "kwargs": {"dest": "/etc/vllm/api-key", "content": "s3cret\\n"},
        "host_name": "gb200-tray-01",
        "local_files": {"tiny-model/config.json": "{}\\n"},
        "facts": {
            "files.File": {"path=/etc/vllm/api-key": {"user": "root", "mode": 600}},
            "deb.DebPackages": {"docker.io": ["set:", "24.0.7-0ubuntu4"]},
            "tasks.facts.DockerImage": {"reference=vllm/vllm-openai:v0.11.0": null}
        },
        "commands": [
            "mkdir -p /etc/vllm",
            {"upload_to": "/etc/vllm/api-key.partial", "content": "s3cret\\n"},
            {"upload_to": "/raid/models/tiny/config.json",
             "from": "<local>/tiny-model/config.json"},
            {"function": "_follow", "args": [{"label": "model"}, false], "kwargs": {}}
        ],
        "noop_description": "/etc/vllm/api-key is current (root, 0600)"
    }

- args, kwargs: the operation's arguments, as JSON. An argument annotated with a dataclass
  (objects_applied's ``config``) is written as an object of its fields and built from it;
  lists become tuples, and ["set:", ...] a set, where the annotation says so.
- host_name: ``host.name`` while the operation runs (default "testhost").
- local_files: controller files the case needs (a source tree, a requirements.lock): path
  relative to the case's own tmp_path -> text. The runner writes them there, and the string
  ``<local>`` anywhere in the case (arguments, facts, commands, noop_description) stands for
  that folder.
- facts: what each fact returns, keyed by the fact class's import path (less
  ``pyinfra.facts.`` for pyinfra's own: "files.Sha256File", "deb.DebPackages"; the whole path
  for ours: "tasks.facts.DockerImage"), then, for a fact asked with arguments, by those
  arguments as pyinfra writes them: "path=/x", several sorted and joined by ", ". A fact
  asked without arguments holds its value directly (DebPackages above). ["set:", ...] is a
  set, as in pyinfra's cases. Strict both ways: a fact the operation asks that the case lacks
  fails the case, and so does one the case holds that the operation never asked.
- commands: exactly what the operation yields, in order. A shell command is its text (what
  the host runs); a file upload is {"upload_to": dest, "from": controller path} or
  {"upload_to": dest, "content": text} for an in-memory file; a FunctionCommand is
  {"function": name, "args": [...], "kwargs": {...}}, dataclasses as objects of their fields.
  Anything else (masked strings, connector arguments) stops the case: extend ``describe``.
- error: text of the OperationValueError the operation raises while planning, for arguments
  no host can fix (then "commands" is [] and no noop is expected).
- noop_description: what the operation passes to ``host.noop``. Required when "commands" is
  empty; a case with commands must have the operation not call ``host.noop`` at all.

How it runs: the runner calls the operation's undecorated generator, which pyinfra's
``@operation`` keeps as ``<operation>._inner`` (as pyinfra's own tests do), with the
``host`` that pyinfra's context hands to operations replaced by ``CaseHost``. Test double: no
host is asked; the facts come from the case, as pyinfra's own operation tests do. No pyinfra
State is set up: these operations read none.

Adding a case: create the JSON file in its operation's folder (a new folder for a new
operation) and run this module; a failing case shows what the operation yielded beside what
the case expects. Write the expected commands from the operation's code and what the host
must see, not by copying what it yielded: a copied case only repeats the code, bugs included.
Every operation needs a case that yields commands and, if it can call host.noop, a case with
"commands": [] (test_every_operation_has_a_case_that_changes_something_...). Operations of
a module in AWAITING_CASES need no case yet: remove the module from it when adding its cases.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import io
import json
import pkgutil
import types
import typing
from pathlib import Path

import pytest
from pyinfra.api import FileUploadCommand, FunctionCommand, StringCommand
from pyinfra.api.exceptions import OperationValueError
from pyinfra.api.util import get_kwargs_str
from pyinfra.context import ctx_host

REPO = Path(__file__).resolve().parents[2]
CASES_DIR = REPO / "tests" / "fixtures" / "operations"
CASES = sorted(CASES_DIR.glob("*/*.json"))
LOCAL = "<local>"
CASE_KEYS = {"description", "args", "kwargs", "host_name", "local_files", "facts", "commands",
             "noop_description", "error"}
# Modules whose operations may lack cases for now, and why; a name here also covers the
# modules named after it with an underscore (tasks.weights: tasks.weights_hub, ...).
AWAITING_CASES = {
}


def awaiting_cases(module_name: str) -> bool:
    return any(module_name == name or module_name.startswith(f"{name}_")
               for name in AWAITING_CASES)


def custom_operations() -> dict[str, types.FunctionType]:
    """Every @operation defined in a module of tasks/, by ``module.function``.

    pyinfra's ``@operation`` keeps the generator as ``_inner`` and marks it with
    ``is_idempotent``; ``@deploy`` keeps an ``_inner`` too, without that mark. An operation a
    module only imports (tasks.vllm_kubernetes imports secret_file_present) counts where defined.
    """
    found = {}
    for module_info in pkgutil.iter_modules([str(REPO / "tasks")]):
        module_name = f"tasks.{module_info.name}"
        if awaiting_cases(module_name):
            continue
        module = importlib.import_module(module_name)
        for name, value in vars(module).items():
            if (inspect.isfunction(value) and value.__module__ == module_name
                    and hasattr(getattr(value, "_inner", None), "is_idempotent")):
                found[f"{module_name}.{name}"] = value
    return found


def operation_of(folder: str):
    module_name, _, name = folder.rpartition(".")
    operation = getattr(importlib.import_module(module_name), name)
    assert hasattr(operation._inner, "is_idempotent"), f"{folder} is no pyinfra @operation"
    return operation


def fact_key(fact_class: type) -> str:
    path = f"{fact_class.__module__}.{fact_class.__name__}"
    return path.removeprefix("pyinfra.facts.")


def parse_value(value):
    """JSON to the Python values facts and arguments hold: ["set:", ...] is a set."""
    if isinstance(value, list):
        if value and value[0] == "set:":
            return {parse_value(item) for item in value[1:]}
        return [parse_value(item) for item in value]
    if isinstance(value, dict):
        return {key: parse_value(item) for key, item in value.items()}
    return value


def build(value, annotation):
    """``value`` (JSON) as ``annotation`` asks: a dataclass from an object of its fields, a
    tuple from a list; recursively, so a dataclass's own fields are built too."""
    if value is None:
        return None
    origin, members = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        (annotation, *_) = [member for member in members if member is not type(None)]
        return build(value, annotation)
    if dataclasses.is_dataclass(annotation) and isinstance(value, dict):
        hints = typing.get_type_hints(annotation)
        return annotation(**{key: build(item, hints[key]) for key, item in value.items()})
    if origin is tuple and isinstance(value, list):
        if len(members) == 2 and members[1] is Ellipsis:
            return tuple(build(item, members[0]) for item in value)
        return tuple(build(item, member) for item, member in zip(value, members, strict=True))
    if origin is list and members:
        return [build(item, members[0]) for item in value]
    if origin is dict and members:
        return {key: build(item, members[1]) for key, item in value.items()}
    return value


def arguments_of(generator, case: dict) -> tuple[list, dict]:
    parameters = list(inspect.signature(generator).parameters)
    hints = typing.get_type_hints(generator)
    args = [build(parse_value(value), hints.get(parameters[index], typing.Any))
            for index, value in enumerate(case.get("args", []))]
    kwargs = {key: build(parse_value(value), hints.get(key, typing.Any))
              for key, value in case.get("kwargs", {}).items()}
    return args, kwargs


def plain(value):
    """A FunctionCommand's arguments as JSON: dataclasses as objects of their fields."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, dict):
        return {str(key): plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(item) for item in value]
    if isinstance(value, (set, frozenset)):
        return ["set:", *sorted(plain(item) for item in value)]
    if isinstance(value, Path):
        return str(value)
    return value


def describe(command):
    """One yielded command in the case's JSON shape (see the module docstring)."""
    if isinstance(command, str):
        return command.strip()  # pyinfra runs a yielded string as StringCommand(text.strip())
    if command.connector_arguments:
        raise TypeError(f"{command!r} carries connector arguments: extend describe()")
    if isinstance(command, StringCommand):
        if command.get_masked_value() != command.get_raw_value():
            raise TypeError(f"{command!r} masks part of itself: extend describe()")
        return command.get_raw_value()
    if isinstance(command, FileUploadCommand):
        if hasattr(command.src, "read"):
            command.src.seek(0)
            content = command.src.read()
            command.src.seek(0)
            if isinstance(content, bytes):
                content = content.decode()
            return {"upload_to": str(command.dest), "content": content}
        return {"upload_to": str(command.dest), "from": str(command.src)}
    if isinstance(command, FunctionCommand):
        return {"function": command.function.__name__, "args": plain(list(command.args)),
                "kwargs": plain(command.kwargs)}
    raise TypeError(f"{command!r}: no JSON shape for this command; extend describe()")


class CaseHost:
    """Test double: no host is asked; the facts come from the case, as pyinfra's own
    operation tests do. It stands in for the pyinfra Host an operation reaches through
    ``from pyinfra import host``: ``name``, ``get_fact`` and ``noop``.

    ``get_fact`` binds the arguments to the fact's ``command`` first, so an argument the fact
    does not take fails as it would on a real host, and records what was asked.
    """

    def __init__(self, name: str, facts: dict):
        self.name = name
        self.facts = facts
        self.asked: set[tuple[str, str | None]] = set()
        self.noop_description: str | None = None

    def get_fact(self, fact_class, *args, **kwargs):
        key = fact_key(fact_class)
        bound = inspect.signature(fact_class().command).bind(*args, **kwargs)
        arguments = get_kwargs_str(bound.arguments) or None
        if key not in self.facts:
            pytest.fail(f"the operation asks fact {key} ({arguments}); the case's facts lack it")
        if arguments is None:
            self.asked.add((key, None))
            return parse_value(self.facts[key])
        answers = self.facts[key]
        if not isinstance(answers, dict) or arguments not in answers:
            pytest.fail(f"the operation asks fact {key} with {arguments!r}; the case answers "
                        f"only {sorted(answers) if isinstance(answers, dict) else answers!r}")
        self.asked.add((key, arguments))
        return parse_value(answers[arguments])

    def noop(self, description: str) -> None:
        self.noop_description = description

    def unasked_facts(self) -> list[str]:
        """The facts the case holds that the operation never asked."""
        unasked = []
        for key, answers in self.facts.items():
            if (key, None) in self.asked:
                continue
            if not any(asked_key == key for asked_key, _ in self.asked):
                unasked.append(key)
                continue
            unasked += [f"{key} {arguments}" for arguments in answers
                        if (key, arguments) not in self.asked]
        return unasked


def with_local(value, folder: str):
    """The case with ``<local>`` replaced by the folder its local_files were written to."""
    if isinstance(value, str):
        return value.replace(LOCAL, folder)
    if isinstance(value, list):
        return [with_local(item, folder) for item in value]
    if isinstance(value, dict):
        return {with_local(key, folder): with_local(item, folder)
                for key, item in value.items()}
    return value


def load_case(path: Path, folder: Path) -> dict:
    case = json.loads(path.read_text())
    unknown = set(case) - CASE_KEYS
    assert not unknown, f"unknown keys {sorted(unknown)}; a case holds only {sorted(CASE_KEYS)}"
    assert case.get("description"), "a case says in its description what it shows"
    for relative, text in case.get("local_files", {}).items():
        file = folder / relative
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_text(text)
    return with_local(case, str(folder))


def run_case(operation, case: dict) -> tuple[list, CaseHost]:
    host = CaseHost(case.get("host_name", "testhost"), case.get("facts", {}))
    args, kwargs = arguments_of(operation._inner, case)
    with ctx_host.use(host):
        commands = [describe(command) for command in operation._inner(*args, **kwargs)]
    return commands, host


@pytest.mark.parametrize("path", CASES, ids=lambda path: f"{path.parent.name}/{path.stem}")
def test_operation_case(path: Path, tmp_path: Path):
    case = load_case(path, tmp_path)
    if "error" in case:
        # Arguments no host can fix: the operation refuses while planning, before any command.
        with pytest.raises(OperationValueError) as raised:
            run_case(operation_of(path.parent.name), case)
        assert case["error"] in str(raised.value)
        assert case["commands"] == []
        return
    commands, host = run_case(operation_of(path.parent.name), case)

    assert commands == case["commands"]
    assert host.unasked_facts() == [], "facts the case holds that the operation never asked"
    if commands:
        assert host.noop_description is None, "an operation that yields commands reports no noop"
        assert "noop_description" not in case, "a case with commands has no noop_description"
    else:
        assert "noop_description" in case, (
            f"a case without commands says what the operation reports: {host.noop_description!r}")
        assert host.noop_description == case["noop_description"]


def case_commands(folder: str) -> list[list]:
    return [json.loads(path.read_text())["commands"]
            for path in sorted((CASES_DIR / folder).glob("*.json"))]


def test_every_operation_has_cases():
    missing = sorted(name for name in custom_operations() if not case_commands(name))
    assert missing == [], f"operations without a case in {CASES_DIR.relative_to(REPO)}"


def test_every_case_folder_names_an_operation_that_needs_cases():
    operations = custom_operations()
    strays = sorted(folder.name for folder in CASES_DIR.iterdir()
                    if folder.is_dir() and folder.name not in operations)
    assert strays == [], ("case folders naming no @operation of tasks/ (renamed? or still "
                          "listed in AWAITING_CASES?)")


# Operations that exist to change nothing: every_host_reached orders the deploy (see its
# docstring) and yields no command by design.
NEVER_CHANGES = {"tasks.operations.every_host_reached"}


def test_every_operation_has_a_case_that_changes_something_and_one_per_noop_path():
    """A case that yields commands for each operation; a no-op case (commands []) for each
    one that can report a no-op (its source calls host.noop)."""
    gaps = []
    for name, operation in custom_operations().items():
        cases = case_commands(name)
        if name in NEVER_CHANGES:
            assert cases == [[]], f"{name} changes nothing: its one case yields no command"
            continue
        if not any(cases):
            gaps.append(f"{name}: no case that yields commands")
        if "host.noop(" in inspect.getsource(operation._inner) and [] not in cases:
            gaps.append(f"{name}: no no-op case")
    assert gaps == []


# The runner checked against itself: what the cases above do not exercise.

@dataclasses.dataclass(frozen=True)
class _Job:
    label: str
    include: tuple[str, ...]


def _follow(job: _Job, verify: bool) -> bool:
    return verify


def test_describe_shows_function_commands_and_in_memory_uploads_as_json():
    job = _Job(label="model", include=("*.json",))
    assert describe(FunctionCommand(_follow, (job, False), {"verify": True})) == {
        "function": "_follow", "args": [{"label": "model", "include": ["*.json"]}, False],
        "kwargs": {"verify": True}}
    upload = FileUploadCommand(io.StringIO("text\n"), "/etc/x")
    assert describe(upload) == {"upload_to": "/etc/x", "content": "text\n"}
    assert describe(upload) == {"upload_to": "/etc/x", "content": "text\n"}, "read twice"


def test_build_makes_dataclasses_and_tuples_from_json():
    assert build({"label": "model", "include": ["*.json"]}, _Job | None) == _Job(
        label="model", include=("*.json",))
    assert build(None, _Job | None) is None


def test_case_host_refuses_what_the_case_does_not_answer():
    from pyinfra.facts.files import File

    host = CaseHost("testhost", {"files.File": {"path=/etc/a": None}})
    with pytest.raises(TypeError):
        host.get_fact(File, filename="/etc/a")  # File's command takes `path`
    with pytest.raises(pytest.fail.Exception, match="path=/etc/b"):
        host.get_fact(File, path="/etc/b")
    assert host.unasked_facts() == ["files.File"]
    assert host.get_fact(File, path="/etc/a") is None
    assert host.unasked_facts() == []

