"""Read-only checks that stop a deploy before its first change."""

from pyinfra import host
from pyinfra.api import deploy

from tasks.settings import resolve


@deploy("Preflight")
def check() -> None:
    """Refuse, before anything on the host changes, data that cannot work.

    Reads every data key in group_data/all.py (through tasks.settings.resolve); raises
    DataError with one line per problem, each naming the host, the key, what was found and what
    is needed. pyinfra prepares every host before it executes any, so one bad host stops the
    whole run with all hosts untouched.
    """
    resolve(host)
