"""tasks/op_order_fast.py: pyinfra's operation order from a stack read without source lines
is the order it computes itself.

The state is a stand-in (a namespace with the two attributes get_operation_order_from_stack
reads); the stack is real: a deploy file compiled and run under its own name, calling through
nested, multi-line calls, as pyinfra runs deploy.py."""

import inspect
import types

import pyinfra
from pyinfra.api import util

from tasks import op_order_fast

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
    monkeypatch.setattr(util, "stack", op_order_fast._stack)
    monkeypatch.setattr(util, "getframeinfo", op_order_fast._getframeinfo)
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
    pyinfra_own = caller_of_caller()
    op_order_fast.install()
    assert util.stack is op_order_fast._stack
    assert util.getframeinfo is op_order_fast._getframeinfo
    fast = caller_of_caller()
    assert fast.function == pyinfra_own.function == "test_install_replaces_what_pyinfra_reads"
    assert fast.lineno == pyinfra_own.lineno + 4 and fast.filename == pyinfra_own.filename
