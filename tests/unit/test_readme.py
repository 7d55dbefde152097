"""README.md stays in step with the code: its data-keys table is the one data-keys-table
generates from tasks/data_keys.py, and its commands are the ones the project runs."""

import subprocess
import sys

from tests.helpers import REPO


def test_readme_table_is_in_step_as_the_command_checks_it():
    # The declarations and their generated table: tests/unit/test_data_keys.py.
    result = subprocess.run([sys.executable, "-m", "tools.data_keys_table", "--check"],
                            cwd=REPO)
    assert result.returncode == 0, "README is out of step: run data-keys-table"


def test_readme_shows_the_two_commands():
    readme = (REPO / "README.md").read_text()
    assert "make demo" in readme and "make test" in readme
    assert "make test" in (REPO / ".ci" / "run").read_text()
