"""Print a pyinfra inventory's hosts with their merged data as JSON:

    python -m tools.inventory inventories/sandbox.py [KEY=VALUE ...]
        ->  {"sbx1": {"ssh_hostname": ...}}

KEY=VALUE pairs override data as pyinfra's `--data` does (same parsing). Relative inventory
paths are relative to the checkout, as pyinfra run from it reads them.

Run in its own process by drift-check and tests/infra/conftest.py: importing pyinfra's CLI
patches gevent into the interpreter, which breaks pytest-xdist workers.
"""

from __future__ import annotations

import json
import sys

from tools.repository import REPO


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    from pyinfra.api import State
    from pyinfra.context import ctx_state

    ctx_state.set(State())
    from pyinfra_cli.inventory import make_inventory
    from pyinfra_cli.util import parse_cli_arg

    overrides = dict(pair.split("=", 1) for pair in argv[1:])
    inventory = make_inventory(argv[0], cwd=str(REPO),
                               override_data={key: parse_cli_arg(value)
                                              for key, value in overrides.items()})
    hosts = {host.name: {**host.data.dict(), "_groups": sorted(map(str, host.groups))}
             for host in inventory}
    json.dump(hosts, sys.stdout, default=list)
    return 0


if __name__ == "__main__":
    sys.exit(main())
