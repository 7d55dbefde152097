"""Three hot spots of pyinfra's CPU on the controller, patched (called from config.py); on a
2-core machine, where the hosts' shells share the cores, the first two were a third of a no-op
run of 8 hosts (cProfile). Measured by the controller's CPU time in a no-op run of 8 sandbox
hosts (median of 10, each left out in turn): frames without column positions ~80 ms, host
data without exceptions ~40 ms.

1. The operation order read from the call stack without source lines. pyinfra orders a
run's operations by the line numbers of the deploy code on the call stack
(pyinfra.api.util.get_operation_order_from_stack). It reads them with inspect.stack() and
inspect.getframeinfo(), which by default also read one line of source for every frame, and
finding the source means scanning sys.modules for each: ~20% of the controller's CPU in a
no-op run of 8 hosts (13 operations a host, 40-odd frames each). pyinfra uses only each
frame's file name and line number: these give them as inspect does (the code's file name,
the frame's line), without source context and without working out each frame's column
positions (inspect.getframeinfo does, twice a frame here): same frames, same order.

2. The global arguments' types read once. Every operation and fact call on every host pops
its global arguments (_sudo, _env, ...) after listing them with typing.get_type_hints() on
their TypedDict, which evaluates every annotation again: ~15% of the controller's CPU in a
no-op run of 8 hosts (31 operations and facts a host). The list never changes during a run.

3. Host data looked up without an exception a layer. pyinfra looks every global argument up
in the host's data on every such call (~30 a call, ~1000 a host in a no-op run): override,
host, groups, inventory and deploy data in turn, each a dict asked with ``data[key]``, whose
KeyError is caught: ~150 exceptions a call, as these keys are seldom set. A plain dict (not a
subclass, whose ``[]`` may do more) is asked with ``in`` first: same answer, same order.

tests/unit/test_pyinfra_cpu.py compares each with pyinfra's own.
"""

from __future__ import annotations

import inspect
import sys
from copy import copy
from functools import cache

from pyinfra.api import arguments, facts, util
from pyinfra.api.host import HostData, extract_callable_datas


def _stack(context: int = 1) -> list[inspect.FrameInfo]:
    # The frames from the caller of stack() outwards, as inspect.stack() gives them (this
    # frame itself left out), without source lines or column positions.
    frames = []
    frame = sys._getframe(1)
    while frame is not None:
        code = frame.f_code
        frames.append(inspect.FrameInfo(frame, code.co_filename, frame.f_lineno, code.co_name,
                                        None, None))
        frame = frame.f_back
    return frames


def _getframeinfo(frame, context: int = 1) -> inspect.Traceback:
    code = frame.f_code
    return inspect.Traceback(code.co_filename, frame.f_lineno, code.co_name, None, None)


_all_global_arguments = arguments.all_global_arguments  # pyinfra's own


@cache
def _global_arguments() -> tuple[tuple[str, type], ...]:
    return tuple(_all_global_arguments())


def _all_global_arguments_cached() -> list[tuple[str, type]]:
    return list(_global_arguments())


def _host_data_getattr(self: HostData, key: str):
    for data in extract_callable_datas(self.datas):
        if type(data) is dict:
            if key in data:
                return copy(data[key])
            continue
        try:
            return copy(data[key])
        except KeyError:
            pass
    raise AttributeError(f"Host `{self.host}` has no data `{key}`")


_host_data_getattr_pyinfra = HostData.__getattr__  # pyinfra's own


def install() -> None:
    util.stack = _stack
    util.getframeinfo = _getframeinfo
    # pop_global_arguments reads the name from its module; the facts module imported it.
    arguments.all_global_arguments = _all_global_arguments_cached
    facts.all_global_arguments = _all_global_arguments_cached
    HostData.__getattr__ = _host_data_getattr
