"""The drift check on a schedule: a systemd timer on the control host.

drift-check (tools/drift_check.py) compares every host of an inventory with the declared state, read-only.
`install` runs it on the host it is applied to: the control host, which holds a checkout of
this repository with its .venv and the operator's SSH key, and whose node_exporter publishes
the Prometheus textfile that SREs alert on.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass

from pyinfra import host
from pyinfra.api import deploy
from pyinfra.operations import files, systemd

from tasks import data_keys
from tasks.data_keys import DataError, problem
from tasks.settings import TEMPLATES, UNIT_DIR
from tools.drift_check import folder_mode

SERVICE_UNIT = "drift-check.service"
TIMER_UNIT = "drift-check.timer"
# drift-check's own limits add up to 3600 s (two 900 s plans when a host is unreachable, then
# 1800 s of checks). The unit allows a little more, so that those limits, which
# still write a report, act before a kill that writes nothing.
TIMEOUT_START_S = 3900
# Small beside the 15-minute default schedule, enough to leave the exact quarter hour.
RANDOMIZED_DELAY_S = 120


@dataclass(frozen=True)
class DriftSettings:
    """A host's drift_* data, checked."""

    host_name: str
    repo_dir: str
    inventory: str
    schedule: str
    out_dir: str
    textfile: str
    user: str
    report_mode: int  # report.json and junit.xml

    @property
    def textfile_dir(self) -> str:
        return posixpath.dirname(self.textfile)

    @property
    def out_dir_mode(self) -> int:
        """The report folder's, as drift-check makes it (tools.drift_check.folder_mode)."""
        return folder_mode(self.report_mode)


def read_drift_settings(host_name: str, data) -> DriftSettings:
    """The drift_* keys of one host's data, checked (tasks/data_keys.py), with the one rule
    they add: a control host names its checkout. DataError holds every problem."""
    problems = data_keys.check(host_name, data)
    if data.get("drift_repo_dir") is None:
        problems.append(problem(host_name, "drift_repo_dir", None, data_keys.BY_NAME[
            "drift_repo_dir"].need + " (required on drift_control hosts: no default)"))
    if problems:
        raise DataError(problems)
    values = data_keys.read(host_name, data)
    return DriftSettings(host_name=host_name,
                       repo_dir=values["drift_repo_dir"].rstrip("/") or "/",
                       inventory=values["drift_inventory"],
                       schedule=values["drift_schedule"].strip(),
                       out_dir=values["drift_out_dir"].rstrip("/") or "/",
                       textfile=values["drift_textfile"], user=values["drift_user"],
                       report_mode=values["drift_report_mode"])


def unit_template_values(config: DriftSettings) -> dict[str, dict]:
    """Unit name -> the explicit values its template (templates/<unit>.j2) receives. None is
    named like an argument of files.template (user, group, mode, ...) or like the host, state
    and inventory objects it hands every template, which a value would clash with or hide."""
    return {
        SERVICE_UNIT: {"service_user": config.user, "repo_dir": config.repo_dir,
                       "inventory_path": config.inventory, "out_dir": config.out_dir,
                       "textfile": config.textfile, "timeout_start_s": TIMEOUT_START_S,
                       "report_mode": f"{config.report_mode:04o}"},
        TIMER_UNIT: {"schedule": config.schedule, "randomized_delay_s": RANDOMIZED_DELAY_S,
                     "service_unit": SERVICE_UNIT},
    }


@deploy("Drift check schedule")
def install() -> None:
    """Converge this host (the control host) to run drift-check on a systemd timer:
    drift-check.service and drift-check.timer installed, the report and textfile folders
    present (the report folder drift_report_mode with search bits), the timer enabled and
    running, systemd reloaded only when a unit changed.

    Data keys: drift_repo_dir, drift_inventory, drift_schedule, drift_out_dir,
    drift_textfile, drift_user, drift_report_mode.
    """
    config = read_drift_settings(host.name, host.data)
    values = unit_template_values(config)
    files.directory(name=f"Create drift report folder {config.out_dir}", path=config.out_dir,
                    user=config.user, mode=f"{config.out_dir_mode:o}")
    # Owned by drift_user too: drift-check writes a temporary file beside the textfile and
    # renames it over, so a reader never sees half a file; that needs the folder writable.
    files.directory(name=f"Create Prometheus textfile folder {config.textfile_dir}",
                    path=config.textfile_dir, user=config.user, mode="755")
    units = [files.template(name=f"Install {unit} unit", src=str(TEMPLATES / f"{unit}.j2"),
                            dest=f"{UNIT_DIR}/{unit}", user="root", group="root", mode="644",
                            **values[unit])
             for unit in (SERVICE_UNIT, TIMER_UNIT)]
    timer_unit = units[1]
    # Restarting a changed timer applies a new schedule now, whatever a reload alone does on
    # the host's systemd version; a changed service unit is read at the next run anyway.
    systemd.service(name=f"Enable and start {TIMER_UNIT}, reload systemd if a unit changed",
                    service=TIMER_UNIT, running=True, enabled=True,
                    daemon_reload=any(unit.will_change for unit in units),
                    restarted=timer_unit.will_change)
