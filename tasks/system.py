"""The host layer every runtime needs: OS packages and the weights folder."""

from pyinfra import host
from pyinfra.api import deploy
from pyinfra.facts.files import Directory
from pyinfra.operations import apt, files

from tasks import facts_together
from tasks.facts import DebPackagesInstalled
from tasks.settings import Settings, read_settings


def packages_installed(packages: list[str]) -> None:
    """Install the Debian packages a host lacks; the apt lists are refreshed only then, so
    offline hosts that already have everything never touch the network. A host that has
    them all is asked nothing more (apt.packages would list its packages a second time)."""
    installed = host.get_fact(DebPackagesInstalled, packages=packages)
    if any(package not in installed for package in packages):
        apt.update(name="Refresh apt package lists")
        apt.packages(name="Install host packages", packages=packages)


def facts_read(settings: Settings) -> list[tuple[type, dict]]:
    """The facts prepare()'s operations read on a host where all is in place (to be asked
    together: tasks/facts_together.py)."""
    return [(DebPackagesInstalled, {"packages": settings.packages}),
            (Directory, {"path": settings.weights_dir})]


@deploy("System")
def prepare() -> None:
    """Converge OS packages and the weights folder. (vllm.service needs no user account: it
    runs as a systemd DynamicUser.)

    Data keys: host_packages, weights_dir.
    """
    settings = read_settings(host)
    facts_together.ask_together(host, facts_read(settings))
    packages_installed(settings.packages)
    files.directory(name=f"Create weights folder {settings.weights_dir}",
                    path=settings.weights_dir, user="root", group="root", mode="755")
