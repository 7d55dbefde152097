"""The drift check on a schedule: a systemd timer on the control host, or a Kubernetes CronJob.

tools/drift-check compares every host of an inventory with the declared state, read-only.
`install` runs it on the host it is applied to: the control host, which holds a checkout of
this repository with its .venv and the operator's SSH key, and whose node_exporter publishes
the Prometheus textfile that SREs alert on. `render_drift_cronjob` is the same check as a
CronJob, for sites that run it in a cluster; it is pure (no pyinfra), and
tests/unit/test_drift_control.py validates it against the Kubernetes 1.34 and 1.35 schemas.
"""

from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass
from pathlib import Path

import jinja2
from pyinfra import host
from pyinfra.api import deploy
from pyinfra.operations import files, systemd

from tasks.settings import DataError, _Reader

TEMPLATES = Path(__file__).resolve().parent.parent / "templates"
UNIT_DIR = "/etc/systemd/system"
SERVICE_UNIT = "drift-check.service"
TIMER_UNIT = "drift-check.timer"
# drift-check's own limits add up to 3600 s (two 900 s plans when a host is unreachable, then
# 1800 s of checks). The unit and the Job allow a little more, so that those limits, which
# still write a report, act before a kill that writes nothing.
TIMEOUT_START_S = 3900
# Small beside the 15-minute default schedule, enough to leave the exact quarter hour.
RANDOMIZED_DELAY_S = 120

# Paths land unquoted in the unit's ExecStart= line: only characters that systemd and a shell
# both take literally (no spaces, quotes, `%` specifiers or `$` variables).
_LITERAL_PATH = re.compile(r"^[A-Za-z0-9_./@+,:=-]+$")
_LITERAL_PATH_NEED = "letters, digits and -_./@+,:= only (the unit's ExecStart takes it as is)"
# The task sets the owner and mode of the report and textfile folders: never of these.
_SHARED_FOLDERS = frozenset({"/", "/etc", "/home", "/opt", "/root", "/srv", "/tmp", "/usr",
                             "/usr/local", "/var", "/var/lib", "/var/tmp"})
_USER_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,31}$")
# Five fields of digits, names and */,-? : the shape of a crontab line, which OnCalendar
# does not read (its quarter hour is *:0/15, cron's is */15 * * * *).
_CRON_LINE = re.compile(r"^\s*[0-9A-Za-z*/,?-]+(\s+[0-9A-Za-z*/,?-]+){4}\s*$")
_CRON_MACRO = re.compile(r"^@(yearly|annually|monthly|weekly|daily|midnight|hourly)$")
# A CronJob's Jobs are named NAME-<11 digits>, and a Job's name must stay a 63-character label.
_CRONJOB_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]{0,50}[a-z0-9])?$")
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
_CONFIG_MAP_KEY = re.compile(r"^[-._a-zA-Z0-9]{1,253}$")
_REPORT_MODE_NEED = ("a file mode 0o000..0o666 without execute bits, e.g. 0o600 (root only) "
                     "or 0o644")


@dataclass(frozen=True)
class DriftConfig:
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
        """The report folder's: the reports' mode with a search bit wherever it has a read
        bit, and the owner's full access (tools/drift-check's folder_mode, kept in step by
        tests/unit/test_drift_control.py)."""
        return self.report_mode | ((self.report_mode & 0o444) >> 2) | 0o700


def read_drift_config(host_name: str, data) -> DriftConfig:
    """Check the drift_* keys of one host's data; raise DataError with one line per problem,
    each naming the host and the key."""
    read = _Reader(host_name, data)

    def read_path(key: str, absolute: bool, need: str, suffix: str = "") -> str | None:
        value = read.get(key, (str,), need)
        if value is None:
            return None
        if absolute != value.startswith("/"):
            read.error(key, value, need)
        elif not _LITERAL_PATH.match(value):
            read.error(key, value, _LITERAL_PATH_NEED)
        elif ".." in value.split("/"):
            read.error(key, value, f"{need}, without ..")
        elif not value.endswith(suffix):
            read.error(key, value, need)
        else:
            return value
        return None

    repo_dir = read_path("drift_repo_dir", True, "an absolute path on this host to a checkout "
                         "of this repository with its .venv (required: no default)")
    inventory = read_path("drift_inventory", False, "an inventory path relative to "
                          "drift_repo_dir, e.g. inventories/gb200.py")
    out_dir = read_path("drift_out_dir", True, "an absolute folder path on this host")
    # node_exporter's textfile collector reads *.prom files only.
    textfile = read_path("drift_textfile", True, "an absolute path on this host ending in "
                         ".prom, in node_exporter's textfile collector folder", suffix=".prom")
    schedule = read.get("drift_schedule", (str,), "a systemd OnCalendar expression, e.g. *:0/15")
    if schedule is not None:
        if not schedule.strip() or "\n" in schedule or "\r" in schedule:
            read.error("drift_schedule", schedule, "one line of systemd OnCalendar, e.g. *:0/15")
        elif _CRON_LINE.match(schedule) or _CRON_MACRO.match(schedule):
            read.error("drift_schedule", schedule, "systemd OnCalendar, not cron syntax "
                       "(every 15 minutes is *:0/15; see `systemd-analyze calendar`)")
    user = read.get("drift_user", (str,), "a user name on this host that holds the SSH key")
    if user is not None and not _USER_NAME.match(user):
        read.error("drift_user", user, "a user name on this host that holds the SSH key")
    report_mode = read.get("drift_report_mode", (int,), _REPORT_MODE_NEED)
    if report_mode is not None and (not 0 <= report_mode <= 0o777 or report_mode & 0o111):
        read.error("drift_report_mode", report_mode, f"{_REPORT_MODE_NEED} (found "
                   f"{'-' if report_mode < 0 else ''}{abs(report_mode):#o})")
    for key, folder in (("drift_out_dir", out_dir),
                        ("drift_textfile", textfile and posixpath.dirname(textfile))):
        if folder and folder.rstrip("/") in _SHARED_FOLDERS | {""}:
            read.error(key, out_dir if key == "drift_out_dir" else textfile,
                       f"a path in a folder of its own, not {folder}: the task sets that "
                       "folder's owner and mode")
    if read.errors:
        raise DataError("invalid host data:\n  " + "\n  ".join(read.errors))
    return DriftConfig(host_name=host_name, repo_dir=repo_dir.rstrip("/") or "/",
                       inventory=inventory, schedule=schedule.strip(),
                       out_dir=out_dir.rstrip("/") or "/", textfile=textfile, user=user,
                       report_mode=report_mode)


def unit_template_values(config: DriftConfig) -> dict[str, dict]:
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
    """Converge this host (the control host) to run tools/drift-check on a systemd timer:
    drift-check.service and drift-check.timer installed, the report and textfile folders
    present (the report folder drift_report_mode with search bits), the timer enabled and
    running, systemd reloaded only when a unit changed.

    Data keys: drift_repo_dir, drift_inventory, drift_schedule, drift_out_dir,
    drift_textfile, drift_user, drift_report_mode.
    """
    config = read_drift_config(host.name, host.data)
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


# ---- Kubernetes: the same check as a CronJob ---------------------------------------------

CRONJOB_TEMPLATE = "drift-check-cronjob.yaml.j2"
# Where the pod sees the Secret and the ConfigMap. The inventory in the ConfigMap points its
# hosts' ssh_key and ssh_known_hosts_file at SSH_MOUNT: pyinfra and the infra checks' OpenSSH
# both read those keys, and OpenSSH looks for default keys in the passwd home, not in $HOME.
SSH_MOUNT = "/etc/vllm-drift/ssh"
INVENTORY_MOUNT = "/etc/vllm-drift/inventory"
CRONJOB_OUT_DIR = "/var/lib/vllm-drift"
# Group-readable, owned by root: the non-root user reads the key through fsGroup. OpenSSH
# accepts that, as it refuses open modes only on keys the user owns.
SSH_FILE_MODE = 0o440
# The root filesystem is read-only: no .pyc files, and home-directory writes (pyinfra's SSH
# client, pytest) go to the /tmp emptyDir.
CRONJOB_ENVIRONMENT = (("PYTHONDONTWRITEBYTECODE", "1"), ("HOME", "/tmp"))


def render_drift_cronjob(*, image: str, service_account: str, ssh_secret: str,
                         inventory_config_map: str, inventory_key: str = "gb200.py",
                         schedule: str = "*/15 * * * *", time_zone: str = "Etc/UTC",
                         name: str = "vllm-drift-check", namespace: str = "default",
                         repo_dir: str = "/opt/kimi-gb200", run_as_user: int = 10001,
                         successful_jobs_history_limit: int = 3,
                         failed_jobs_history_limit: int = 5, starting_deadline_s: int = 300,
                         cpu_request: str = "500m", memory_request: str = "512Mi",
                         memory_limit: str = "2Gi") -> str:
    """
    The YAML text of a batch/v1 CronJob that runs tools/drift-check in a pod. Pure: no
    pyinfra, no cluster; apply it with kubectl.

    + image: an image holding this repository at repo_dir with its .venv, and a passwd entry
      for run_as_user (OpenSSH refuses a user id without one)
    + service_account: the ServiceAccount the pods run as (its API token is not mounted)
    + ssh_secret: Secret holding the private key and a known_hosts file, mounted read-only at
      SSH_MOUNT; hosts missing from known_hosts read as "could not check"
    + inventory_config_map: ConfigMap holding the inventory, mounted at INVENTORY_MOUNT
    + inventory_key: the inventory's file name (key) in that ConfigMap; the repository's
      group_data still applies, as the check runs from repo_dir
    + schedule: cron syntax (five fields or a macro such as @hourly), read in time_zone
    + time_zone: an IANA zone name for the schedule
    + name, namespace: the CronJob's; name is at most 52 characters (Jobs add 11)
    + repo_dir: where the image holds the checkout
    + run_as_user: user and group id of the pod; also the fsGroup that may read the key
    + successful_jobs_history_limit, failed_jobs_history_limit: finished Jobs kept for
      `kubectl logs`
    + starting_deadline_s: a run that could not start within this is skipped, not run late
    + cpu_request, memory_request, memory_limit: the container's quantities

    No node_exporter textfile in a pod: the Job's outcome is the signal (kube-state-metrics),
    so drift (exit 1) and could-not-check (exit 2) both fail the Job, and its log names the
    hosts. The Job is cut off after TIMEOUT_START_S, as the systemd unit is.
    """
    problems = []
    if not _CRONJOB_NAME.match(name):
        problems.append(f"name={name!r}: a DNS label of at most 52 characters")
    if not _DNS_LABEL.match(namespace):
        problems.append(f"namespace={namespace!r}: a DNS label")
    for key, value in (("service_account", service_account), ("ssh_secret", ssh_secret),
                       ("inventory_config_map", inventory_config_map)):
        if not isinstance(value, str) or not _DNS_SUBDOMAIN.match(value):
            problems.append(f"{key}={value!r}: an object name (DNS subdomain)")
    if not isinstance(inventory_key, str) or not _CONFIG_MAP_KEY.match(inventory_key) \
            or inventory_key in (".", ".."):
        problems.append(f"inventory_key={inventory_key!r}: a ConfigMap key (letters, digits, "
                        "-._)")
    if not isinstance(schedule, str) or not (_CRON_MACRO.match(schedule.strip())
                                             or _CRON_LINE.match(schedule)):
        problems.append(f"schedule={schedule!r}: cron syntax, five fields or a macro such as "
                        "@hourly (the time zone goes in time_zone)")
    if not isinstance(time_zone, str) or not re.match(r"^[A-Za-z0-9_+/-]+$", time_zone):
        problems.append(f"time_zone={time_zone!r}: an IANA zone name such as Etc/UTC")
    if not isinstance(image, str) or not image or any(c.isspace() for c in image):
        problems.append(f"image={image!r}: an image reference")
    if not isinstance(repo_dir, str) or not repo_dir.startswith("/") \
            or not _LITERAL_PATH.match(repo_dir):
        problems.append(f"repo_dir={repo_dir!r}: an absolute path in the image")
    for key, value, least in (("run_as_user", run_as_user, 1),
                              ("successful_jobs_history_limit",
                               successful_jobs_history_limit, 0),
                              ("failed_jobs_history_limit", failed_jobs_history_limit, 0),
                              ("starting_deadline_s", starting_deadline_s, 1)):
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            problems.append(f"{key}={value!r}: an integer >= {least}")
    if problems:
        raise ValueError("invalid drift check CronJob values:\n  " + "\n  ".join(problems))

    repo_dir = repo_dir.rstrip("/") or "/"
    context = {
        "name": name, "namespace": namespace,
        "labels": [("app.kubernetes.io/name", name),
                   ("app.kubernetes.io/component", "drift-check"),
                   ("app.kubernetes.io/managed-by", "pyinfra")],
        "schedule": schedule.strip(), "time_zone": time_zone,
        "starting_deadline_s": starting_deadline_s,
        "successful_jobs_history_limit": successful_jobs_history_limit,
        "failed_jobs_history_limit": failed_jobs_history_limit,
        "active_deadline_s": TIMEOUT_START_S,
        "service_account": service_account, "run_as_user": run_as_user,
        "image": image, "repo_dir": repo_dir,
        "command": [f"{repo_dir}/.venv/bin/python", f"{repo_dir}/tools/drift-check",
                    f"{INVENTORY_MOUNT}/{inventory_key}", "--out", CRONJOB_OUT_DIR],
        "environment": list(CRONJOB_ENVIRONMENT),
        "cpu_request": cpu_request, "memory_request": memory_request,
        "memory_limit": memory_limit,
        "ssh_mount": SSH_MOUNT, "inventory_mount": INVENTORY_MOUNT, "out_dir": CRONJOB_OUT_DIR,
        "ssh_secret": ssh_secret, "ssh_file_mode": SSH_FILE_MODE,
        "inventory_config_map": inventory_config_map,
    }
    # pyinfra's own template settings, so this renders as files.template would.
    environment = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES / "k8s")),
                                     undefined=jinja2.StrictUndefined,
                                     keep_trailing_newline=True)
    return environment.get_template(CRONJOB_TEMPLATE).render(**context)
