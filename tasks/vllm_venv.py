"""The venv runtime: vLLM pip-installed into a venv on the host, from a pushed wheelhouse."""

from pathlib import Path

from pyinfra import host
from pyinfra.api import deploy
from pyinfra.facts.files import Directory, Link
from pyinfra.operations import files

from tasks import facts_together
from tasks.operations import wheelhouse_venv_installed
from tasks.settings import Settings, read_settings


def facts_read(settings: Settings) -> list[tuple[type, dict]]:
    """The facts install()'s operations read on a host whose venv is in place (to be asked
    together: tasks/facts_together.py)."""
    return [(Directory, {"path": str(Path(settings.venv_dir).parent)}),
            (Link, {"path": settings.venv_dir})]


@deploy("vLLM venv")
def install():
    """Converge `vllm_venv_dir` to a venv holding exactly the wheelhouse's pinned wheels;
    returns the operation (restart trigger).

    Data keys: vllm_venv_dir, vllm_wheelhouse_dir.
    """
    settings = read_settings(host)
    facts_together.ask_together(host, facts_read(settings))
    files.directory(name="Create vLLM folder", path=str(Path(settings.venv_dir).parent),
                    user="root", group="root", mode="755")
    return wheelhouse_venv_installed(name="Install vLLM from the wheelhouse into a venv",
                           wheelhouse_dir=settings.wheelhouse_dir, venv_link=settings.venv_dir)
