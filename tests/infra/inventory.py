"""Print a pyinfra inventory's hosts with their merged data as JSON:

    python -m tests.infra.inventory inventories/sandbox.py [KEY=VALUE ...]
        ->  {"sbx1": {"ssh_hostname": ...}}

KEY=VALUE pairs override data as pyinfra's `--data` does (same parsing).

Run in its own process by tests/infra/conftest.py: importing pyinfra's CLI patches gevent into
the interpreter, which breaks pytest-xdist workers.
"""

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent


def main() -> int:
    from pyinfra.api import State
    from pyinfra.context import ctx_state

    ctx_state.set(State())
    from pyinfra_cli.inventory import make_inventory
    from pyinfra_cli.util import parse_cli_arg

    overrides = dict(pair.split("=", 1) for pair in sys.argv[2:])
    inventory = make_inventory(sys.argv[1], cwd=str(REPO),
                               override_data={key: parse_cli_arg(value)
                                              for key, value in overrides.items()})
    hosts = {host.name: {**host.data.dict(), "_groups": sorted(map(str, host.groups))}
             for host in inventory}
    json.dump(hosts, sys.stdout, default=list)
    return 0


if __name__ == "__main__":
    sys.exit(main())
