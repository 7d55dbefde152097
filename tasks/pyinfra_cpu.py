"""Two hot spots of pyinfra's CPU on the controller, patched (called from config.py); on a
2-core machine, where the hosts' shells share the cores, they were a third of a no-op run of
8 hosts (cProfile).

1. The operation order read from the call stack without source lines. pyinfra orders a
run's operations by the line numbers of the deploy code on the call stack
(pyinfra.api.util.get_operation_order_from_stack). It reads them with inspect.stack() and
inspect.getframeinfo(), which by default also read one line of source for every frame, and
finding the source means scanning sys.modules for each: ~20% of the controller's CPU in a
no-op run of 8 hosts (13 operations a host, 40-odd frames each). pyinfra uses only each
frame's file name and line number, which these give the same without source context: same
frames, same order.

2. The global arguments' types read once. Every operation and fact call on every host pops
its global arguments (_sudo, _env, ...) after listing them with typing.get_type_hints() on
their TypedDict, which evaluates every annotation again: ~15% of the controller's CPU in a
no-op run of 8 hosts (31 operations and facts a host). The list never changes during a run.

tests/unit/test_pyinfra_cpu.py compares each with pyinfra's own.
"""

from __future__ import annotations

import inspect
import sys
from functools import cache

from pyinfra.api import arguments, facts, util


def _stack(context: int = 1) -> list[inspect.FrameInfo]:
    # The frames from the caller of stack() outwards, as inspect.stack() gives them (this
    # frame itself left out), without source lines.
    return inspect.getouterframes(sys._getframe(1), 0)


def _getframeinfo(frame, context: int = 1) -> inspect.Traceback:
    return inspect.getframeinfo(frame, 0)


_all_global_arguments = arguments.all_global_arguments  # pyinfra's own


@cache
def _global_arguments() -> tuple[tuple[str, type], ...]:
    return tuple(_all_global_arguments())


def _all_global_arguments_cached() -> list[tuple[str, type]]:
    return list(_global_arguments())


def install() -> None:
    util.stack = _stack
    util.getframeinfo = _getframeinfo
    # pop_global_arguments reads the name from its module; the facts module imported it.
    arguments.all_global_arguments = _all_global_arguments_cached
    facts.all_global_arguments = _all_global_arguments_cached
