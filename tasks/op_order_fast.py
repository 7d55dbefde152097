"""Read the call stack without source lines when pyinfra orders operations (called from
config.py).

pyinfra orders a run's operations by the line numbers of the deploy code on the call stack
(pyinfra.api.util.get_operation_order_from_stack). It reads them with inspect.stack() and
inspect.getframeinfo(), which by default also read one line of source for every frame, and
finding the source means scanning sys.modules for each: ~20% of the controller's CPU in a
no-op run of 8 hosts (cProfile; 13 operations a host, 40-odd frames each). pyinfra uses only
each frame's file name and line number, which these give the same without source context:
same frames, same order. tests/unit/test_op_order_fast.py compares both on one stack.
"""

from __future__ import annotations

import inspect
import sys

from pyinfra.api import util


def _stack(context: int = 1) -> list[inspect.FrameInfo]:
    # The frames from the caller of stack() outwards, as inspect.stack() gives them (this
    # frame itself left out), without source lines.
    return inspect.getouterframes(sys._getframe(1), 0)


def _getframeinfo(frame, context: int = 1) -> inspect.Traceback:
    return inspect.getframeinfo(frame, 0)


def install() -> None:
    util.stack = _stack
    util.getframeinfo = _getframeinfo
