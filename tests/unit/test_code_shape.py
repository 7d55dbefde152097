"""The shape the code keeps so the next engineer can change it: short functions in tasks/, no
private name reached across modules."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.helpers import REPO

# A function longer than this does more than one thing; split it into named steps.
MAX_FUNCTION_LINES = 60
FIRST_PARTY = ("tasks", "tools", "harness", "tests")


def python_files(*folders: str) -> list[Path]:
    return sorted(path for folder in folders for path in (REPO / folder).rglob("*.py"))


def test_no_function_in_tasks_is_longer_than_the_limit():
    long = []
    for path in python_files("tasks"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({lines})")
    assert long == []


def test_no_private_name_is_imported_from_another_module():
    reached = []
    files = python_files(*FIRST_PARTY) + [REPO / "deploy.py", REPO / "bench.py",
                                          *sorted((REPO / "inventories").glob("*.py"))]
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(FIRST_PARTY):
                reached += [f"{path.relative_to(REPO)}: {node.module}.{alias.name}"
                            for alias in node.names if alias.name.startswith("_")]
    assert reached == []
