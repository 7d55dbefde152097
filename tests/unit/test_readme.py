"""README.md stays in step with the code: its data-keys table lists exactly the keys of
group_data/all.py with their defaults and comments (tools/data-keys-table rewrites it), and
every key there has a comment."""

import subprocess
import sys

from tests.helpers import REPO


def test_every_key_has_a_comment():
    result = subprocess.run([sys.executable, "-c", "import runpy; m = runpy.run_path("
                             "'tools/data-keys-table'); print([k for k, _, c in "
                             "m['declared_keys']() if not c])"],
                            cwd=REPO, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_readme_table_matches_group_data_all():
    result = subprocess.run([sys.executable, str(REPO / "tools" / "data-keys-table"), "--check"],
                            cwd=REPO)
    assert result.returncode == 0, "README is out of step: run tools/data-keys-table"


def test_readme_shows_the_two_commands():
    readme = (REPO / "README.md").read_text()
    assert "make demo" in readme and "make test" in readme
    assert "make test" in (REPO / ".ci" / "run").read_text()
