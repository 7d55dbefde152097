"""tasks/pyinfra_cpu.py: pyinfra's operation order from a stack read without source lines
is the order it computes itself; the global arguments listed once are the ones it lists.

The state is a stand-in (a namespace with the two attributes get_operation_order_from_stack
reads); the stack is real: a deploy file compiled and run under its own name, calling through
nested, multi-line calls, as pyinfra runs deploy.py."""

import inspect
import types

import pyinfra
from pyinfra.api import arguments, facts, util

from tasks import pyinfra_cpu

DEPLOY = '''
def operation(order):
    return order(
        STATE,
    )


def task(order):
    return [operation(order),
            operation(
                order)]


RESULT = task(ORDER)
'''


def orders(tmp_path, monkeypatch) -> list[list[int]]:
    deploy = tmp_path / "deploy.py"
    deploy.write_text(DEPLOY)
    state = types.SimpleNamespace(current_deploy_filename=str(deploy), current_op_file_number=3)
    monkeypatch.setattr(pyinfra, "is_cli", True)
    namespace = {"STATE": state, "ORDER": util.get_operation_order_from_stack}
    exec(compile(DEPLOY, str(deploy), "exec"), namespace)
    return namespace["RESULT"]


def test_the_order_without_source_lines_is_pyinfra_own(tmp_path, monkeypatch):
    monkeypatch.setattr(util, "stack", inspect.stack)
    monkeypatch.setattr(util, "getframeinfo", inspect.getframeinfo)
    pyinfra_own = orders(tmp_path, monkeypatch)
    monkeypatch.setattr(util, "stack", pyinfra_cpu._stack)
    monkeypatch.setattr(util, "getframeinfo", pyinfra_cpu._getframeinfo)
    fast = orders(tmp_path, monkeypatch)
    assert fast == pyinfra_own
    # The file's op number, then the deploy file's lines outermost first: two calls, two orders.
    first, second = fast
    assert first[:2] == [3, 14] and first != second and first < second


def caller_of_caller():
    # pyinfra's get_call_location: the frame two above get_caller_frameinfo's own.
    return util.get_caller_frameinfo()


def test_install_replaces_what_pyinfra_reads(monkeypatch):
    monkeypatch.setattr(util, "stack", inspect.stack)
    monkeypatch.setattr(util, "getframeinfo", inspect.getframeinfo)
    for module in (arguments, facts):
        monkeypatch.setattr(module, "all_global_arguments", module.all_global_arguments)
    pyinfra_own = caller_of_caller()
    pyinfra_cpu.install()
    assert util.stack is pyinfra_cpu._stack
    assert util.getframeinfo is pyinfra_cpu._getframeinfo
    assert arguments.all_global_arguments is facts.all_global_arguments \
        is pyinfra_cpu._all_global_arguments_cached
    fast = caller_of_caller()
    assert fast.function == pyinfra_own.function == "test_install_replaces_what_pyinfra_reads"
    assert fast.lineno == pyinfra_own.lineno + 6 and fast.filename == pyinfra_own.filename


def test_the_global_arguments_listed_once_are_pyinfra_own():
    listed = pyinfra_cpu._all_global_arguments_cached()
    assert listed == list(arguments.get_type_hints(arguments.AllArguments).items())
    assert ("_sudo", bool) in listed and len(listed) > 20
    listed.clear()  # a caller's list is its own
    assert pyinfra_cpu._all_global_arguments_cached() == pyinfra_cpu._all_global_arguments()
