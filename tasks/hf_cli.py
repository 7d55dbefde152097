"""The `hf` CLI of huggingface_hub, pinned, in its own venv on the host, on PATH for operators."""

from __future__ import annotations

from pathlib import Path

from pyinfra import host
from pyinfra.api import deploy
from pyinfra.facts.files import Directory, Link
from pyinfra.operations import files

from tasks import data_keys
from tasks.data_keys import DataError
from tasks.operations import wheelhouse_venv_installed
from tasks.settings import pinned_wheelhouse

BIN_LINK = "/usr/local/bin/hf"


def read_hf_cli_settings(host_name: str, data) -> tuple[str, str, str]:
    """(version, venv_dir, wheelhouse_dir) after checking the host's data (tasks/data_keys.py)
    and that the wheelhouse holds that version; DataError holds every problem."""
    values = data_keys.read(host_name, data)
    version, venv_dir = values["hf_cli_version"], values["hf_cli_venv_dir"]
    wheelhouse, problems = pinned_wheelhouse(host_name, "hf_cli_wheelhouse_dir",
                                             values["hf_cli_wheelhouse_dir"], "huggingface-hub",
                                             version, "hf-wheelhouse")
    if problems:
        raise DataError(problems)
    return version, venv_dir, wheelhouse


def facts_read(host_name: str, data) -> list[tuple[type, dict]]:
    """The facts install()'s operations read on a host that has the CLI (to be asked together:
    tasks/facts_together.py)."""
    _, venv_dir, _ = read_hf_cli_settings(host_name, data)
    return [(Directory, {"path": str(Path(venv_dir).parent)}), (Link, {"path": venv_dir}),
            (Link, {"path": BIN_LINK})]


@deploy("HF CLI")
def install() -> str:
    """Converge hf_cli_venv_dir to a venv holding exactly the hf wheelhouse's pinned wheels and
    /usr/local/bin/hf to its `hf`; returns the venv's python for the weights fetch.

    Data keys: hf_cli_version, hf_cli_venv_dir, hf_cli_wheelhouse_dir.
    """
    version, venv_dir, wheelhouse = read_hf_cli_settings(host.name, host.data)
    files.directory(name="Create hf CLI folder", path=str(Path(venv_dir).parent),
                    user="root", group="root", mode="755")
    wheelhouse_venv_installed(name=f"Install hf CLI (huggingface_hub {version}) into a venv",
                    wheelhouse_dir=wheelhouse, venv_link=venv_dir)
    files.link(name=f"Link {BIN_LINK} to the hf CLI", path=BIN_LINK, target=f"{venv_dir}/bin/hf")
    return f"{venv_dir}/bin/python3"
