"""README.md stays in step with the code: its data-keys table lists exactly the keys of
group_data/all.py with their defaults, and every key there has a comment."""

import ast
import re

from tests.helpers import REPO


def declared_keys() -> list[tuple[str, str, str]]:
    """(key, default as written, comment above it) for every key in group_data/all.py."""
    source = (REPO / "group_data" / "all.py").read_text()
    lines = source.splitlines()
    keys = []
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign):
            comment = []
            index = node.lineno - 2
            while index >= 0 and lines[index].startswith("# ") and "----" not in lines[index]:
                comment.insert(0, lines[index][2:])
                index -= 1
            keys.append((node.targets[0].id, ast.get_source_segment(source, node.value),
                         " ".join(comment)))
    return keys


def readme_table() -> list[tuple[str, str]]:
    readme = (REPO / "README.md").read_text()
    return re.findall(r"^\| `([a-z0-9_]+)` \| `(.*?)` \|", readme, flags=re.MULTILINE)


def test_every_key_has_a_comment():
    assert [key for key, _, comment in declared_keys() if not comment] == []


def test_readme_table_matches_group_data_all():
    expected = [(key, default) for key, default, _ in declared_keys()]
    table = "\n".join(f"| `{k}` | `{d}` | {c} |" for k, d, c in declared_keys())
    assert readme_table() == expected, f"README's data-keys table should read:\n{table}"


def test_readme_shows_the_two_commands():
    readme = (REPO / "README.md").read_text()
    assert "make demo" in readme and "make test" in readme
    assert "make test" in (REPO / ".ci" / "run").read_text()
