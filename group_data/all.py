"""Every default, for every host: the declarations in tasks/data_keys.py (each key's default,
what it needs, what it means), README.md's data-keys table is generated from them.

Group files (gb200.py, sandbox.py) hold differences only; inventories hold per-machine facts.
"""

from tasks.data_keys import DEFAULTS

__all__ = list(DEFAULTS)
globals().update(DEFAULTS)
