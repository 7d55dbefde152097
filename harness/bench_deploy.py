"""Benchmark the deploy loop on its own sandbox and print a markdown table for the README.

    bench-deploy [HOST_COUNT ...]          (default: 1 4; needs root and `make venv artefacts`)
    SANDBOX_RUNTIME=docker bench-deploy 1  (the docker runtime: image pushed and loaded)

The work is a sequence of timed commands (sandbox up, pyinfra, chat, drift-check), so it stays
a shell script, harness/bench_deploy.sh, which says what it measures; this module only runs it
from the checkout.
"""

from __future__ import annotations

import sys

from tools.repository import REPO, run_script

SCRIPT = REPO / "harness" / "bench_deploy.sh"


def main(argv: list[str] | None = None) -> int:
    return run_script(SCRIPT, argv)


if __name__ == "__main__":
    sys.exit(main())
