"""Report hosts that moved away from the declared state, without changing any of them.

    drift-check INVENTORY [--out DIR] [--textfile FILE] [--workers N] [--no-checks]
                [--report-mode MODE]

Two looks at every host, both read-only:
  1. the deploy's plan: `pyinfra INVENTORY deploy.py --dry --json` (pyinfra exits 0 even with
     changes pending; the plan's `hosts_with_change` is what counts), and
  2. the infra checks: `pytest tests/infra --inventory INVENTORY` (GPUs, mounts, service,
     port, real endpoint answers).

Exit status: 0 in sync, 1 drift (a planned change or a failed check; each is named with its
host), 2 could not check (unreachable host, bad inventory, a tool that crashed). Writes, under
--out (default results/drift/): report.json, junit.xml (the checks, plus one "deploy plan"
case per host) and drift.prom, a Prometheus textfile (also to --textfile, for node_exporter's
textfile collector). Runs from cron or a systemd timer: no terminal, no prompt.

No secret reaches a report: the checks print short tracebacks and never hold a key in a form
pytest prints (tests/infra/conftest.py), and every secret the inventory's data names (the
files of its *_key_file and *_token_file keys, what its *_key_command and *_token_command keys
print, and HF_TOKEN) is replaced by <redacted> in everything written or printed. report.json
and junit.xml get --report-mode (default 0600: the owner only; tasks/drift_control.py passes
drift_report_mode), and a folder --out creates that mode with search bits; drift.prom stays
0644 for node_exporter.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path

from tools.repository import REPO, missing_packages, venv_command

IN_SYNC, DRIFT, UNCHECKED = 0, 1, 2
METRIC = "vllm_deploy"
# Report files' mode unless --report-mode says otherwise: the owner only.
REPORT_MODE = 0o600
REDACTED = "<redacted>"
# Data keys naming a controller file that holds a secret (vllm_api_key_file,
# weights_hf_token_file) and environment variables holding one.
SECRET_FILE_KEYS = ("_key_file", "_token_file")
SECRET_VARIABLES = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")
# pyinfra's own words for a host it could not reach (after the name, padded to the longest).
UNREACHABLE = re.compile(r"\[([^\]]+)\]\s+(?:Could not connect|Authentication error|SSH error|"
                         r"Could not resolve hostname|EOF error|SSH host key error)(.*)")


def inventory_hosts(inventory: str, overrides: list[str] = (),
                    env: dict | None = None) -> dict[str, dict]:
    """Host name -> its merged data (with `_groups`), under KEY=VALUE overrides as pyinfra's
    --data reads them; `env`: the environment the inventory reads (default: this one)."""
    result = subprocess.run([sys.executable, "-m", "tools.inventory", inventory, *overrides],
                            cwd=REPO, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"cannot load inventory {inventory}: "
                           f"{result.stderr.strip().splitlines()[-1:]}")
    return json.loads(result.stdout)


def known_secrets(hosts: dict[str, dict], environ=os.environ) -> set[str]:
    """Every secret value this check could meet: the contents of the controller files the
    hosts' *_key_file and *_token_file keys name (relative paths are relative to the
    repository, as tasks/settings.py reads them), what their *_key_command and
    *_token_command keys print, and the Hub token variables."""
    # Here, not at the top: tasks needs the controller's packages, which main() checks first.
    from tasks.secrets import COMMAND_KEY_ENDINGS, from_command

    secrets = {environ.get(name, "").strip() for name in SECRET_VARIABLES}
    for data in hosts.values():
        for key, value in data.items():
            if key.endswith(COMMAND_KEY_ENDINGS) and isinstance(value, str) and value:
                try:
                    secrets.add(from_command("drift-check", key, value)[0] or "")
                except ValueError:
                    pass  # no command line (unbalanced quotes): the plan fails on the data
                continue
            if not (key.endswith(SECRET_FILE_KEYS) and isinstance(value, str) and value):
                continue
            path = Path(os.path.expanduser(value))
            try:
                secrets.add((path if path.is_absolute() else REPO / path).read_text().strip())
            except (OSError, UnicodeDecodeError):
                continue  # the checks cannot read it either: they fail on the data
    return {secret for secret in secrets if secret}


def scrub(value, secrets: set[str]):
    """``value`` (a string, or lists and dicts of them) with every secret replaced, longest
    first, so that a secret holding another is replaced whole."""
    if isinstance(value, str):
        for secret in sorted(secrets, key=len, reverse=True):
            value = value.replace(secret, REDACTED)
        return value
    if isinstance(value, list):
        return [scrub(item, secrets) for item in value]
    if isinstance(value, dict):
        return {key: scrub(item, secrets) for key, item in value.items()}
    return value


def scrub_xml(root: ElementTree.Element, secrets: set[str]) -> None:
    """Replace every secret in the text, tail and attributes of every element, in place: the
    parsed values, so an escaped secret (&amp;, &quot;) is caught as well."""
    for element in root.iter():
        element.text, element.tail = scrub(element.text, secrets), scrub(element.tail, secrets)
        for name, attribute in element.attrib.items():
            element.set(name, scrub(attribute, secrets))


def deploy_plan(inventory: str, exclude: list[str]) -> tuple[dict | None, str]:
    command = [venv_command("pyinfra"), inventory, "deploy.py", "--dry", "--json"]
    for name in exclude:
        command += ["--exclude", name]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True,
                            stdin=subprocess.DEVNULL, timeout=900)
    try:
        plan = json.loads(result.stdout) if result.returncode == 0 else None
    except ValueError:
        plan = None
    return plan, result.stdout + result.stderr


def start_infra_checks(inventory: str, hosts: list[str], junit: Path,
                       workers: int) -> subprocess.Popen:
    """The infra checks of ``hosts``, started in the background (they write ``junit``)."""
    junit.unlink(missing_ok=True)
    # --option=value: pytest reads a lone argument starting with @ (@local) as a file of args.
    command = [sys.executable, "-m", "pytest", "tests/infra", f"--inventory={inventory}",
               f"--infra-limit={','.join(hosts)}", "-q", "-p", "no:cacheprovider",
               # The interconnect test holds every GPU: never on a schedule against live hosts.
               "-m", "not interconnect",
               # Short tracebacks print no frame's arguments; no captured output in the XML.
               "--tb=short", f"--junitxml={junit}", "-o", "junit_family=xunit1",
               "-o", "junit_logging=no"]
    if workers > 1:
        command += ["-n", str(workers)]
    # Its own process group, so that stopping it ends its xdist workers too.
    return subprocess.Popen(command, cwd=REPO, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


def default_workers(hosts: list[str]) -> int:
    """One xdist worker per host, at most one per CPU and 8: more workers than CPUs only add
    start-up (4 hosts on 2 cores: 9.1 s with 2 workers, 12.4 s with 4)."""
    return max(1, min(len(hosts), os.cpu_count() or 1, 8))


def stop(process: subprocess.Popen) -> None:
    """End the checks and their workers: the process group they were started in."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()


def infra_failures(process: subprocess.Popen, hosts: list[str],
                   junit: Path) -> dict[str, list]:
    """Failed check names per host, from the JUnit XML the checks wrote once they end."""
    try:
        process.wait(timeout=1800)
    except subprocess.TimeoutExpired:
        stop(process)
        raise
    failures: dict[str, list] = {host: [] for host in hosts}
    if not junit.exists():
        raise RuntimeError("the infra checks wrote no report")
    for case in ElementTree.parse(junit).iter("testcase"):
        if case.find("failure") is None and case.find("error") is None:
            continue
        host = next((prop.get("value") for prop in case.iter("property")
                     if prop.get("name") == "host"), None)
        detail = (case.find("failure") if case.find("failure") is not None
                  else case.find("error")).get("message", "")
        failures.setdefault(host or "?", []).append(
            {"check": case.get("name"), "message": detail.splitlines()[0][:300] if detail else ""})
    return failures


def add_plan_cases(junit: Path, hosts: dict) -> ElementTree.Element:
    """The checks' JUnit XML (when they wrote one), with one case per host for the deploy
    plan beside their cases."""
    root = ElementTree.parse(junit).getroot() if junit.exists() else ElementTree.Element(
        "testsuites")
    if root.tag != "testsuites":
        wrapper = ElementTree.Element("testsuites")
        wrapper.append(root)
        root = wrapper
    suite = ElementTree.SubElement(root, "testsuite", name="deploy-plan", tests=str(len(hosts)))
    failed = 0
    for name, host in sorted(hosts.items()):
        case = ElementTree.SubElement(suite, "testcase", classname="deploy-plan",
                                      name=f"deploy plan has no change [{name}]")
        if host["status"] == "unreachable":
            ElementTree.SubElement(case, "error", message=host["reason"])
            failed += 1
        elif host["changed_operations"]:
            ElementTree.SubElement(case, "failure", message="pending: " + "; ".join(
                host["changed_operations"]))
            failed += 1
    suite.set("failures", str(failed))
    return root


def folder_mode(report_mode: int) -> int:
    """The report folder's mode: the reports' mode with a search bit wherever it has a read
    bit, and the owner's full access (drift-check writes beside the reports)."""
    return report_mode | ((report_mode & 0o444) >> 2) | 0o700


def report_mode_argument(text: str) -> int:
    """--report-mode: octal digits (600, 0600, 0o600) of a mode without execute bits."""
    try:
        mode = int(text.removeprefix("0o"), 8)
    except ValueError:
        mode = -1
    if not 0 <= mode <= 0o777 or mode & 0o111:
        raise argparse.ArgumentTypeError(
            f"{text!r}: need an octal file mode 000..666 without execute bits, e.g. 600")
    return mode


def write_atomically(path: Path, text: str, mode: int = 0o644) -> None:
    """Write beside ``path`` (created 0600), set ``mode``, then rename over it: a reader never
    sees half a file, nor the text under a looser mode than asked."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False,
                                     prefix=f".{path.name}.") as handle:
        handle.write(text)
    os.chmod(handle.name, mode)
    os.replace(handle.name, path)


def prometheus(report: dict) -> str:
    lines = [
        f"# HELP {METRIC}_drift 1 when the host has planned changes or failed checks.",
        f"# TYPE {METRIC}_drift gauge",
    ]
    for name, host in sorted(report["hosts"].items()):
        lines.append(f'{METRIC}_drift{{host="{name}"}} {int(host["status"] == "drift")}')
    lines += [f"# HELP {METRIC}_check_failures Failed infra checks on the host.",
              f"# TYPE {METRIC}_check_failures gauge"]
    for name, host in sorted(report["hosts"].items()):
        lines.append(f'{METRIC}_check_failures{{host="{name}"}} {len(host["failed_checks"])}')
    lines += [f"# HELP {METRIC}_unreachable 1 when the host could not be checked.",
              f"# TYPE {METRIC}_unreachable gauge"]
    for name, host in sorted(report["hosts"].items()):
        lines.append(f'{METRIC}_unreachable{{host="{name}"}} '
                     f'{int(host["status"] == "unreachable")}')
    lines += [f"# HELP {METRIC}_drift_last_run_timestamp_seconds When the drift check last ran.",
              f"# TYPE {METRIC}_drift_last_run_timestamp_seconds gauge",
              f"{METRIC}_drift_last_run_timestamp_seconds {report['finished']:.0f}",
              f"# HELP {METRIC}_drift_exit_code 0 in sync, 1 drift, 2 could not check.",
              f"# TYPE {METRIC}_drift_exit_code gauge",
              f"{METRIC}_drift_exit_code {report['exit_code']}"]
    return "\n".join(lines) + "\n"


def check(inventory: str, work: Path, workers: int | None,
          run_checks: bool) -> tuple[dict, ElementTree.Element]:
    """Both looks at every host: the report and the JUnit XML, every known secret already
    replaced in both. The checks write their XML into ``work``, a folder of this run only."""
    started = time.time()
    report: dict = {"inventory": inventory, "started": started, "hosts": {}, "errors": []}
    junit = work / "junit.xml"
    try:
        data = inventory_hosts(inventory)
    except RuntimeError as error:
        report["errors"].append(str(error))
        return scrub(report, known_secrets({})), add_plan_cases(junit, {})
    secrets = known_secrets(data)
    names = sorted(data)
    hosts = {name: {"status": "in_sync", "changed_operations": [], "failed_checks": [],
                    "reason": ""} for name in names}

    checks = None
    if run_checks and names:
        # Both looks are read-only and independent: the checks run while pyinfra plans.
        checks = start_infra_checks(inventory, names, junit, workers or default_workers(names))
    plan, output = deploy_plan(inventory, exclude=[])
    unreachable = {match.group(1): match.group(0) for match in UNREACHABLE.finditer(output)
                   if match.group(1) in hosts}
    if plan is None and unreachable:
        # The run stops when a host is unreachable (config.FAIL_PERCENT = 0): plan the others.
        plan, output = deploy_plan(inventory, exclude=sorted(unreachable))
    for name, line in unreachable.items():
        hosts[name].update(status="unreachable", reason=line.strip())
    if plan is None:
        report["errors"].append("pyinfra could not plan the deploy: "
                                + " | ".join(output.strip().splitlines()[-3:]))
    else:
        for operation in plan["plan"]:
            for name in operation["hosts_with_change"]:
                if name in hosts:
                    hosts[name]["changed_operations"].append(operation["name"])

    reachable = [name for name in names if hosts[name]["status"] != "unreachable"]
    if checks is not None and unreachable:
        # Checks against a host that does not answer wait out every timeout: check the others.
        stop(checks)
        checks = (start_infra_checks(inventory, reachable, junit,
                                     workers or default_workers(reachable)) if reachable else None)
    if checks is None:
        junit.unlink(missing_ok=True)
    else:
        try:
            failures = infra_failures(checks, reachable, junit)
        except (RuntimeError, subprocess.TimeoutExpired) as error:
            report["errors"].append(f"infra checks: {error}")
            failures = {}
        for name, failed in failures.items():
            if name in hosts:
                hosts[name]["failed_checks"] = failed
    for host in hosts.values():
        if host["status"] != "unreachable" and (host["changed_operations"]
                                                or host["failed_checks"]):
            host["status"] = "drift"
    cases = add_plan_cases(junit, hosts)
    scrub_xml(cases, secrets)
    report["hosts"] = hosts
    return scrub(report, secrets), cases


def write_reports(report: dict, cases: ElementTree.Element, out: Path, textfile: Path | None,
                  report_mode: int) -> None:
    """report.json and junit.xml under ``out`` with ``report_mode``, drift.prom there and at
    ``textfile`` with 0644. A folder made here gets folder_mode(report_mode); an existing one
    keeps its mode (the deploy sets it on the control host; --out may name a shared folder)."""
    if not out.is_dir():
        out.mkdir(parents=True)
        os.chmod(out, folder_mode(report_mode))
    write_atomically(out / "report.json", json.dumps(report, indent=2) + "\n", report_mode)
    write_atomically(out / "junit.xml", ElementTree.tostring(
        cases, encoding="unicode", xml_declaration=True) + "\n", report_mode)
    metrics = prometheus(report)
    write_atomically(out / "drift.prom", metrics)
    if textfile:
        write_atomically(textfile, metrics)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inventory")
    parser.add_argument("--out", type=Path, default=REPO / "results" / "drift")
    parser.add_argument("--textfile", type=Path, help="also write the Prometheus textfile here")
    parser.add_argument("--workers", type=int,
                        help="hosts checked at once (default: one per host, <= CPUs, <= 8)")
    parser.add_argument("--no-checks", action="store_true", help="the deploy plan only")
    parser.add_argument("--report-mode", type=report_mode_argument, default=REPORT_MODE,
                        help="octal mode of report.json and junit.xml (default 600)")
    args = parser.parse_args(argv)
    missing = missing_packages("drift-check", "pyinfra", "pytest", "testinfra",
                               prefix="could not check: ")
    if missing:
        print(missing, file=sys.stderr)
        return UNCHECKED

    # The checks' own XML waits in a private folder until it is scrubbed.
    with tempfile.TemporaryDirectory(prefix="drift-check-") as work:
        report, cases = check(args.inventory, Path(work), args.workers, not args.no_checks)
    statuses = {host["status"] for host in report["hosts"].values()}
    if report["errors"] or "unreachable" in statuses or not report["hosts"]:
        code = UNCHECKED
    elif "drift" in statuses:
        code = DRIFT
    else:
        code = IN_SYNC
    report.update(finished=time.time(), exit_code=code)
    write_reports(report, cases, args.out, args.textfile, args.report_mode)

    for name, host in sorted(report["hosts"].items()):
        if host["status"] == "unreachable":
            print(f"UNCHECKED {name}: {host['reason']}")
        for operation in host["changed_operations"]:
            print(f"DRIFT {name}: planned change: {operation}")
        for failed in host["failed_checks"]:
            print(f"DRIFT {name}: failed check: {failed['check']}: {failed['message']}")
    for error in report["errors"]:
        print(f"UNCHECKED: {error}")
    verdict = {IN_SYNC: "in sync", DRIFT: "drift", UNCHECKED: "could not check"}[code]
    print(f"drift-check: {verdict}: {len(report['hosts'])} host(s) in "
          f"{report['finished'] - report['started']:.1f}s; report in {args.out}")
    return code


if __name__ == "__main__":
    sys.exit(main())
