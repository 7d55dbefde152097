"""tasks/system.py planned on a @fake host (no apt here to install from): packages asked by
name, apt run only for one that is missing."""

from __future__ import annotations

import pytest
from pyinfra.api import Config, Inventory, State, StringCommand
from pyinfra.api.connect import connect_all
from pyinfra.api.deploy import add_deploy
from pyinfra.facts.deb import DebPackages
from pyinfra.facts.files import Directory

from tasks import system
from tasks.facts import DebPackagesInstalled
from tests.helpers import fact_command, group_data, planned_commands

PACKAGES = ["python3-venv", "libnuma1", "curl", "iproute2"]


def plan(installed: dict[str, str]) -> dict[str, list[str]]:
    data = {**group_data("sandbox"), "host_packages": PACKAGES, "weights_dir": "/raid/models",
            "vllm_accept_open_endpoint": True}
    answers = {
        fact_command(DebPackagesInstalled, packages=PACKAGES):
            [f"ii \t{name}\t{version}" for name, version in installed.items()],
        fact_command(DebPackages): [f"ii  {name}  {version}  arm64  (description)"
                                    for name, version in installed.items()],
        fact_command(Directory, path="/raid/models"):
            ["user=root group=root mode=drwxr-xr-x atime=0 mtime=0 ctime=0 size=4096 "
             "'/raid/models'"],
    }
    inventory = Inventory(([("@fake/tray-01", {**data, "fake_responses": answers,
                                               "fake_delay": 0, "fake_delay_jitter": 0})], {}))
    state = State(inventory, Config())
    connect_all(state)
    add_deploy(state, system.prepare)
    return planned_commands(state, inventory.get_host("@fake/tray-01"),
                            lambda command: command.get_raw_value()
                            if isinstance(command, StringCommand) else str(command))


def test_a_host_with_every_package_runs_no_apt():
    assert plan({name: "1.0-1" for name in PACKAGES}) == {}


@pytest.mark.parametrize("missing", ["curl", "iproute2"])
def test_a_missing_package_refreshes_the_lists_and_installs_it(missing):
    planned = plan({name: "1.0-1" for name in PACKAGES if name != missing})
    assert list(planned) == ["Refresh apt package lists", "Install host packages"]
    (install,) = planned["Install host packages"]
    assert "apt-get" in install and install.endswith(f"install {missing}")
