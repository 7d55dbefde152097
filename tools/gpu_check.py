"""GPU acceptance on a GPU host itself: the GPU facts, the preflight, the GPU checks and the
interconnect test through pyinfra's @local connector, changing nothing.

    gpu-check OUT_DIR [PYTHON]

The work is a sequence of commands whose output is kept and searched, so it stays a shell
script, tools/gpu_check.sh, which says what each case expects; this module only runs it from
the checkout. PYTHON (default: python3 on PATH) is the interpreter that runs pyinfra and pytest.
Exit status: 0 when every case behaved as described, 1 otherwise.
"""

from __future__ import annotations

import sys

from tools.repository import REPO, run_script

SCRIPT = REPO / "tools" / "gpu_check.sh"


def main(argv: list[str] | None = None) -> int:
    return run_script(SCRIPT, argv)


if __name__ == "__main__":
    sys.exit(main())
