"""The `hf` CLI of huggingface_hub, pinned, in its own venv on the host, on PATH for operators."""

from __future__ import annotations

from pathlib import Path

from pyinfra import host
from pyinfra.api import deploy
from pyinfra.operations import files

from tasks.operations import wheelhouse_venv
from tasks.settings import DataError, _resolve_path

BIN_LINK = "/usr/local/bin/hf"


def read(host_name: str, data) -> tuple[str, str, str]:
    """(version, venv_dir, wheelhouse_dir) after checking them; DataError names host and key."""
    values = {key: data.get(key) for key in ("hf_cli_version", "hf_cli_venv_dir",
                                             "hf_cli_wheelhouse_dir")}
    errors = []
    version = values["hf_cli_version"]
    if not isinstance(version, str) or not version[:1].isdigit():
        errors.append(f"{host_name}: hf_cli_version = {version!r}: a huggingface_hub version "
                      "like 2.4.0")
    venv_dir = values["hf_cli_venv_dir"]
    if not isinstance(venv_dir, str) or not venv_dir.startswith("/"):
        errors.append(f"{host_name}: hf_cli_venv_dir = {venv_dir!r}: an absolute path on the host")
    wheelhouse = values["hf_cli_wheelhouse_dir"]
    if not isinstance(wheelhouse, str):
        errors.append(f"{host_name}: hf_cli_wheelhouse_dir = {wheelhouse!r}: a folder made by "
                      "tools/hf-wheelhouse")
    elif isinstance(version, str):
        wheelhouse = _resolve_path(wheelhouse)
        lock = Path(wheelhouse) / "requirements.lock"
        pinned = f"huggingface-hub=={version} "
        if not lock.is_file():
            errors.append(f"{host_name}: hf_cli_wheelhouse_dir = {wheelhouse!r}: a folder with "
                          "requirements.lock: run tools/hf-wheelhouse")
        elif not any(line.startswith(pinned) for line in lock.read_text().splitlines()):
            errors.append(f"{host_name}: hf_cli_wheelhouse_dir = {wheelhouse!r}: holds no "
                          f"huggingface_hub {version} (hf_cli_version): run tools/hf-wheelhouse "
                          f"--version {version}")
    if errors:
        raise DataError("invalid host data:\n  " + "\n  ".join(errors))
    return version, venv_dir, wheelhouse


@deploy("HF CLI")
def install() -> str:
    """Converge hf_cli_venv_dir to a venv holding exactly the hf wheelhouse's pinned wheels and
    /usr/local/bin/hf to its `hf`; returns the venv's python for the weights fetch.

    Data keys: hf_cli_version, hf_cli_venv_dir, hf_cli_wheelhouse_dir.
    """
    version, venv_dir, wheelhouse = read(host.name, host.data)
    files.directory(name="Create hf CLI folder", path=str(Path(venv_dir).parent),
                    user="root", group="root", mode="755")
    wheelhouse_venv(name=f"Install hf CLI (huggingface_hub {version}) into a venv",
                    wheelhouse_dir=wheelhouse, venv_link=venv_dir)
    files.link(name=f"Link {BIN_LINK} to the hf CLI", path=BIN_LINK, target=f"{venv_dir}/bin/hf")
    return f"{venv_dir}/bin/python3"
