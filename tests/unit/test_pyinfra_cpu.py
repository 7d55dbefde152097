"""tasks/pyinfra_cpu.py: pyinfra's operation order from a stack read without source lines
is the order it computes itself; the global arguments listed once are the ones it lists; host
data looked up without exceptions is what pyinfra's own lookup answers.

The state is a stand-in (a namespace with the two attributes get_operation_order_from_stack
reads); the stack is real: a deploy file compiled and run under its own name, calling through
nested, multi-line calls, as pyinfra runs deploy.py."""

import inspect
import types
from collections import defaultdict

import pyinfra
import pytest
from pyinfra.api import arguments, facts, util
from pyinfra.api.host import HostData

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
    monkeypatch.setattr(HostData, "__getattr__", pyinfra_cpu._host_data_getattr_pyinfra)
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
    assert HostData.__getattr__ is pyinfra_cpu._host_data_getattr
    fast = caller_of_caller()
    assert fast.function == pyinfra_own.function == "test_install_replaces_what_pyinfra_reads"
    assert fast.lineno == pyinfra_own.lineno + 7 and fast.filename == pyinfra_own.filename


def test_the_global_arguments_listed_once_are_pyinfra_own():
    listed = pyinfra_cpu._all_global_arguments_cached()
    assert listed == list(arguments.get_type_hints(arguments.AllArguments).items())
    assert ("_sudo", bool) in listed and len(listed) > 20
    listed.clear()  # a caller's list is its own
    assert pyinfra_cpu._all_global_arguments_cached() == pyinfra_cpu._all_global_arguments()


def test_host_data_looked_up_as_pyinfra_does():
    """Each layer kind pyinfra stacks (override dict, host and inventory dicts, a callable
    giving the groups' or deploy data) and a dict subclass whose [] makes what it lacks: the
    same value, from the same layer, copied, and the same AttributeError for what none has."""
    layers = ({"_sudo": True, "shared": [1]},          # host data
              lambda: {"shared": [2], "group_only": 3},  # groups' data, evaluated each time
              {"_sudo": False, "last": 5},               # inventory data
              defaultdict(lambda: "made", {"deep": 4}))  # a subclass: [] answers anything
    data = HostData("host-1", *layers)
    data.override = "set"  # the override layer, first
    asked = ["_sudo", "shared", "group_only", "deep", "last", "override", "_su_user"]
    ours = {key: pyinfra_cpu._host_data_getattr(data, key) for key in asked}
    own = {key: pyinfra_cpu._host_data_getattr_pyinfra(data, key) for key in asked}
    assert ours == own == {"_sudo": True, "shared": [1], "group_only": 3, "deep": 4,
                           "last": 5, "override": "set", "_su_user": "made"}
    assert ours["shared"] is not layers[0]["shared"]  # a copy, as pyinfra hands it out
    without_subclass = HostData("host-1", *layers[:3])
    for lookup in (pyinfra_cpu._host_data_getattr, pyinfra_cpu._host_data_getattr_pyinfra):
        with pytest.raises(AttributeError, match="^Host `host-1` has no data `_su_user`$"):
            lookup(without_subclass, "_su_user")
