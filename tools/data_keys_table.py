"""Rewrite README.md's data-keys table from the declarations in tasks/data_keys.py.

    data-keys-table          # rewrite the table in place
    data-keys-table --check  # exit 1 if the README is out of step (tests do this too)
"""

from __future__ import annotations

import re
import sys

from tools.repository import REPO

TABLE = re.compile(r"(\| key \| default \| need \| meaning \| read by \|\n\|---\|---\|---\|---\|"
                   r"---\|\n)(?:\|.*\|\n)+")


def literal(value) -> str:
    """A default as a person would write it in group data: 2**30, 100 * 10**9, not digits."""
    if isinstance(value, float) and value >= 1e6 and value == int(value):
        exponent = len(str(int(value))) - 1
        return f"{value / 10**exponent}e{exponent}"
    if isinstance(value, int) and not isinstance(value, bool) and value >= 2**20:
        if value & (value - 1) == 0:
            return f"2**{value.bit_length() - 1}"
        for power in (12, 9, 6):
            if value % 10**power == 0:
                return f"{value // 10**power} * 10**{power}"
    return repr(value)


def table() -> str:
    from tasks.data_keys import KEYS

    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    rows = []
    for key in KEYS:
        shown = key.show(key.default) if key.show is not repr else literal(key.default)
        rows.append(f"| `{key.name}` | `{cell(shown)}` | {cell(key.need)} | {cell(key.doc)} "
                    f"| {key.concern} |")
    return "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    readme = REPO / "README.md"
    text = readme.read_text()
    updated = TABLE.sub(lambda match: match.group(1) + table(), text)
    if "--check" in argv:
        return 0 if updated == text else 1
    readme.write_text(updated)
    return 0


if __name__ == "__main__":
    sys.exit(main())
