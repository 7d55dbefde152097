"""Print a pyinfra inventory's hosts with their merged data as JSON:

    python -m tests.infra.inventory inventories/sandbox.py  ->  {"sbx1": {"ssh_hostname": ...}}

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

    inventory = make_inventory(sys.argv[1], cwd=str(REPO))
    hosts = {host.name: {**host.data.dict(), "_groups": sorted(map(str, host.groups))}
             for host in inventory}
    json.dump(hosts, sys.stdout, default=list)
    return 0


if __name__ == "__main__":
    sys.exit(main())
