"""The venv runtime: vLLM pip-installed into a venv on the host, from a pushed wheelhouse."""

from pathlib import Path

from pyinfra import host
from pyinfra.api import deploy
from pyinfra.operations import files

from tasks.operations import wheelhouse_venv_installed
from tasks.settings import read_settings


@deploy("vLLM venv")
def install():
    """Converge `vllm_venv_dir` to a venv holding exactly the wheelhouse's pinned wheels;
    returns the operation (restart trigger).

    Data keys: vllm_venv_dir, vllm_wheelhouse_dir.
    """
    settings = read_settings(host)
    files.directory(name="Create vLLM folder", path=str(Path(settings.venv_dir).parent),
                    user="root", group="root", mode="755")
    return wheelhouse_venv_installed(name="Install vLLM from the wheelhouse into a venv",
                           wheelhouse_dir=settings.wheelhouse_dir, venv_link=settings.venv_dir)
