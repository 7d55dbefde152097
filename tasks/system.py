"""The host layer every runtime needs: OS packages, the service user, the weights folder."""

from pyinfra import host
from pyinfra.api import deploy
from pyinfra.facts.deb import DebPackages
from pyinfra.operations import apt, files, server

from tasks.settings import resolve


@deploy("System")
def prepare() -> None:
    """Converge OS packages, the `vllm` system user and the weights folder.

    Data keys: host_packages, weights_dir.
    """
    settings = resolve(host)
    installed = host.get_fact(DebPackages)
    if any(package not in installed for package in settings.packages):
        # Only then: offline hosts that already have everything never touch the network.
        apt.update(name="Refresh apt package lists")
    apt.packages(name="Install host packages", packages=settings.packages)
    server.user(name="Create vllm system user", user="vllm", system=True,
                home="/var/lib/vllm", shell="/usr/sbin/nologin", create_home=False)
    files.directory(name=f"Create weights folder {settings.weights_dir}",
                    path=settings.weights_dir, user="root", group="root", mode="755")
