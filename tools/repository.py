"""What every command needs to know about the checkout it runs from.

Standard library only: a command imports this before it can tell the user that the
controller's packages are missing.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import runpy
import subprocess
import sys
import types
from pathlib import Path

# The checkout: commands read deploy.py, group_data/ and tests/infra/ from it, and `make venv`
# installs it in editable mode, so this is the folder the code is in, never a copy.
REPO = Path(__file__).resolve().parent.parent
FIX = "run `make venv`, then `. .venv/bin/activate`"


def group_data(*groups: str, directory: Path = REPO / "group_data") -> dict:
    """group_data/all.py, then each named group file on top, as pyinfra merges them. Group
    files are data that pyinfra executes by path, so they are executed by path here too.
    Raises FileNotFoundError naming a group file that does not exist."""
    data: dict = {}
    for group in ("all", *groups):
        path = directory / f"{group}.py"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such group data file")
        values = runpy.run_path(str(path))
        # pyinfra's rule: __all__ when the file sets it, else every name it did not import.
        names = values.get("__all__") or [
            key for key, value in values.items() if not key.startswith("_")
            and not isinstance(value, types.ModuleType) and key not in imported_names(path)]
        data.update({key: values[key] for key in names})
    return data


def imported_names(path: Path) -> set[str]:
    """Names a Python file binds by `import` at its top level (pyinfra keeps them out of
    group data)."""
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update(alias.asname or alias.name.split(".")[0] for alias in node.names)
    return names


def file_sha256(path: Path) -> str:
    """A controller file's sha256, read in 1 MiB blocks (wheels and shards are large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def missing_packages(command: str, *packages: str, prefix: str = "") -> str | None:
    """The one line a command prints when this Python lacks the controller's packages (a
    shell without the activated venv), naming them and the fix; None when all import."""
    missing = [name for name in packages if importlib.util.find_spec(name) is None]
    if not missing:
        return None
    verb = "is" if len(missing) == 1 else "are"
    return (f"{command}: {prefix}{', '.join(missing)} {verb} not importable by "
            f"{sys.executable}: {FIX}")


def venv_command(name: str) -> str:
    """A console script beside this Python (pyinfra, pytest), else the name for PATH."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def run_script(script: Path, argv: list[str] | None) -> int:
    """Run one of the commands that stay shell scripts (gpu-check, bench-deploy) with bash,
    passing the arguments on; its exit status."""
    argv = sys.argv[1:] if argv is None else argv
    return subprocess.run(["bash", str(script), *argv]).returncode
