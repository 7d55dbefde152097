"""tasks/drift_control.py: the drift check's systemd units, the deploy that installs them and
the checks on its data. No host needed."""

from __future__ import annotations

import argparse
import hashlib
import http.server
import inspect
import json
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import jinja2
import jinja2.meta
import pytest
from pyinfra.api import Config, FileUploadCommand, Inventory, State, StringCommand
from pyinfra.api.connect import connect_all
from pyinfra.api.deploy import add_deploy
from pyinfra.api.util import get_template
from pyinfra.context import ctx_host, ctx_state
from pyinfra.operations import files

from tasks import drift_control
from tasks.data_keys import DEFAULTS, DataError
from tasks.drift_control import (SERVICE_UNIT, TEMPLATES, TIMER_UNIT, UNIT_DIR,
                                 read_drift_settings, unit_template_values)
from tests.helpers import REPO
from tools import drift_check

REPO_ON_CONTROL = "/srv/kimi-gb200"
FAKE_HOST = "@fake/control"


def control_data(**overrides) -> dict:
    return {**DEFAULTS, "drift_repo_dir": REPO_ON_CONTROL, **overrides}


def render_units(data: dict) -> dict[str, str]:
    """Unit name -> text, rendered by pyinfra's own get_template (StrictUndefined, trailing
    newline kept) from the values install() passes to files.template."""
    config = read_drift_settings("control", data)
    return {unit: get_template(str(TEMPLATES / f"{unit}.j2")).render(values)
            for unit, values in unit_template_values(config).items()}


def directives(text: str) -> dict[str, list[str]]:
    """Key -> every value it is given in a unit file, comments and sections left out."""
    found: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line and not line.startswith(("#", "[")):
            key, value = line.split("=", 1)
            found.setdefault(key, []).append(value)
    return found


# (a) The units as pyinfra renders them.

def test_service_runs_the_drift_check_from_the_checkout():
    service = directives(render_units(control_data())[SERVICE_UNIT])
    assert service["ExecStart"] == [
        f"{REPO_ON_CONTROL}/.venv/bin/drift-check "
        "inventories/gb200.py --out /var/lib/vllm-drift "
        "--textfile /var/lib/prometheus/node-exporter/vllm_drift.prom --report-mode 0600"]
    assert service["WorkingDirectory"] == [REPO_ON_CONTROL]
    assert service["Type"] == ["oneshot"]
    assert service["User"] == ["root"]
    # Drift (1) is reported by the textfile; only could-not-check (2) fails the unit.
    assert service["SuccessExitStatus"] == ["1"]
    assert service["TimeoutStartSec"] == [str(drift_control.TIMEOUT_START_S)]
    assert service["NoNewPrivileges"] == ["yes"]
    assert "ProtectHome" not in service, "the SSH key under the home folder must stay readable"


def test_service_follows_the_data():
    service = directives(render_units(control_data(
        drift_repo_dir="/home/operator/kimi-gb200/", drift_inventory="inventories/sandbox.py",
        drift_user="operator", drift_out_dir="/var/tmp/drift",
        drift_textfile="/srv/textfiles/drift.prom", drift_report_mode=0o640))[SERVICE_UNIT])
    assert service["ExecStart"] == [
        "/home/operator/kimi-gb200/.venv/bin/drift-check "
        "inventories/sandbox.py --out /var/tmp/drift --textfile /srv/textfiles/drift.prom "
        "--report-mode 0640"]
    assert service["User"] == ["operator"]


def test_timer_follows_the_schedule():
    timer = directives(render_units(control_data(drift_schedule="Mon..Fri *-*-* 06:00"))[
        TIMER_UNIT])
    assert timer["OnCalendar"] == ["Mon..Fri *-*-* 06:00"]
    assert timer["Persistent"] == ["true"]
    assert timer["RandomizedDelaySec"] == [str(drift_control.RANDOMIZED_DELAY_S)]
    assert timer["Unit"] == [SERVICE_UNIT]
    assert timer["WantedBy"] == ["timers.target"]


@pytest.mark.parametrize("unit", [SERVICE_UNIT, TIMER_UNIT])
def test_templates_take_exactly_the_values_given(unit):
    """StrictUndefined stops a missing value at render time; this also catches a value that
    is passed but never used, or a template that reads pyinfra's host object behind the
    task's back."""
    source = (TEMPLATES / f"{unit}.j2").read_text()
    used = jinja2.meta.find_undeclared_variables(jinja2.Environment().parse(source))
    config = read_drift_settings("control", control_data())
    values = set(unit_template_values(config)[unit])
    assert used == values
    # A value named like a files.template argument breaks the call; one named host, state or
    # inventory silently replaces the object pyinfra hands every template.
    taken = set(inspect.signature(files.template._inner).parameters) | {"host", "state",
                                                                         "inventory"}
    assert not values & taken
    assert source.startswith("# Managed by tasks/drift_control.py")


# (b) systemd's own reading of the units.

def test_units_pass_systemd_analyze_verify(tmp_path):
    """`systemd-analyze verify` on both rendered units, in a temporary folder, when this machine
    has it (shutil.which). verify also requires ExecStart's program to exist, so a stand-in
    checkout holds a .venv/bin/drift-check. Without systemd-analyze the test checks the units' text
    only (every line a comment, a section or Key=Value), and warns that it did no more, rather
    than skipping."""
    repo = tmp_path / "checkout"
    (repo / ".venv" / "bin").mkdir(parents=True)
    (repo / ".venv" / "bin" / "drift-check").symlink_to(os.path.realpath(sys.executable))
    units = render_units(control_data(drift_repo_dir=str(repo)))
    # The timer starts the service, so only the timer is enabled and has an [Install].
    wanted_sections = {SERVICE_UNIT: ["Unit", "Service"], TIMER_UNIT: ["Unit", "Timer", "Install"]}
    for unit, text in units.items():
        assert re.findall(r"^\[(\w+)\]$", text, flags=re.M) == wanted_sections[unit]
        for line in text.splitlines():
            assert re.match(r"^(#.*|\[\w+\]|[A-Z]\w*=.+|)$", line), f"{unit}: {line!r}"
        (tmp_path / unit).write_text(text)

    analyzer = shutil.which("systemd-analyze")
    if analyzer is None:
        warnings.warn("systemd-analyze is not installed: the drift check's units were checked "
                      "as text only")
        return
    result = subprocess.run([analyzer, "verify", *(str(tmp_path / unit) for unit in units)],
                            capture_output=True, text=True, timeout=60)
    ours = [line for line in (result.stdout + result.stderr).splitlines()
            if "drift-check" in line]
    assert result.returncode == 0 and not ours, result.stdout + result.stderr

    # The same verify refuses a cron-style schedule: the check above can fail.
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / SERVICE_UNIT).write_text(units[SERVICE_UNIT])
    (bad / TIMER_UNIT).write_text(units[TIMER_UNIT].replace("OnCalendar=*:0/15",
                                                            "OnCalendar=*/15 * * * *"))
    result = subprocess.run([analyzer, "verify", str(bad / TIMER_UNIT)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode != 0 and "calendar" in result.stderr, result.stderr


# (c) The deploy's plan, on pyinfra's @fake connector.

def stat_line(path: str, mode: str, user: str = "root", size: int = 4096) -> str:
    """What `stat -c` prints for a path, in the format pyinfra's File fact asks for."""
    return (f"user={user} group=root mode={mode} atime=1700000000 mtime=1700000000 "
            f"ctime=1700000000 size={size} '{path}'")


def host_answers(folders: dict[str, str], units: dict[str, str], timer_running: bool,
                 modes: dict[str, str] | None = None) -> dict:
    """fake_responses for a host whose folders (path -> owner, mode drwxr-xr-x unless
    ``modes`` says otherwise) and units (path -> text) exist, and whose timer is running and
    enabled, or neither. Matchers are tried in order."""
    answers: dict = {}
    for path, text in units.items():
        digest = hashlib.sha1(text.encode()).hexdigest()
        answers[re.compile(rf"sha1sum {re.escape(path)} ")] = f"{digest}  {path}"
        answers[re.compile(rf"\(test -e {re.escape(path)} \|\|")] = stat_line(
            path, "-rw-r--r--", size=len(text.encode()))
    for path, owner in folders.items():
        answers[re.compile(rf"\(test -e {re.escape(path)} \|\|")] = stat_line(
            path, (modes or {}).get(path, "drwxr-xr-x"), user=owner)
    if timer_running:
        answers[f"--property SubState {TIMER_UNIT}"] = [f"Id={TIMER_UNIT}", "SubState=waiting"]
        answers[f"--property UnitFileState {TIMER_UNIT}"] = [f"Id={TIMER_UNIT}",
                                                             "UnitFileState=enabled"]
    return answers


def plan(data: dict, answers: dict) -> tuple[list[tuple[str, list]], int]:
    """Plan install() on one fake host: (operation name, commands) in order, and how many
    operations pyinfra counted as changes. Uploads read as ("upload", dest, text)."""
    inventory = Inventory(([(FAKE_HOST, {**data, "fake_responses": answers, "fake_delay": 0,
                                         "fake_delay_jitter": 0})], {}))
    state = State(inventory, Config())
    connect_all(state)
    add_deploy(state, drift_control.install)
    host = inventory.get_host(FAKE_HOST)
    operations = []
    with ctx_state.use(state), ctx_host.use(host):
        for op_hash in state.get_op_order():
            (name,) = state.op_meta[op_hash].names
            commands = []
            for command in state.get_op_data_for_host(host, op_hash).command_generator():
                if isinstance(command, FileUploadCommand):
                    commands.append(("upload", command.dest, command.src.getvalue()))
                else:
                    assert isinstance(command, StringCommand)
                    commands.append(command.get_raw_value())
            operations.append((name.split(" | ", 1)[1], commands))
    return operations, state.get_meta_for_host(host).ops_change


def test_deploy_plan_on_a_fake_host():
    """A fake connector stands in for the control host: a real control host needs a checkout
    of this repository with its venv, which sandbox hosts lack; the units themselves are
    checked by systemd-analyze above. Here the plan itself is the subject. First run: an
    empty host (only systemd's unit folder) gets both units, the folders, one daemon-reload and
    the timer enabled and started. Second run: the host answers that the files hold what was
    uploaded and the timer runs and is enabled, and nothing changes."""
    data = control_data()
    service_path, timer_path = f"{UNIT_DIR}/{SERVICE_UNIT}", f"{UNIT_DIR}/{TIMER_UNIT}"
    textfile_dir = "/var/lib/prometheus/node-exporter"
    empty = host_answers({UNIT_DIR: "root"}, {}, timer_running=False)
    first, changes = plan(data, empty)
    units = render_units(data)
    unit_commands = {path: [("upload", path, units[unit]), f"chown root:root {path}",
                            f"chmod 644 {path}"]
                     for unit, path in ((SERVICE_UNIT, service_path), (TIMER_UNIT, timer_path))}
    assert first == [
        ("Create drift report folder /var/lib/vllm-drift",
         ["mkdir -p /var/lib/vllm-drift", "chmod 700 /var/lib/vllm-drift",
          "chown root /var/lib/vllm-drift"]),
        (f"Create Prometheus textfile folder {textfile_dir}",
         [f"mkdir -p {textfile_dir}", f"chmod 755 {textfile_dir}", f"chown root {textfile_dir}"]),
        (f"Install {SERVICE_UNIT} unit", unit_commands[service_path]),
        (f"Install {TIMER_UNIT} unit", unit_commands[timer_path]),
        (f"Enable and start {TIMER_UNIT}, reload systemd if a unit changed",
         ["systemctl daemon-reload", f"systemctl start {TIMER_UNIT}",
          f"systemctl enable {TIMER_UNIT}"]),
    ]
    assert changes == 5

    converged = host_answers(
        {UNIT_DIR: "root", "/var/lib/vllm-drift": "root", textfile_dir: "root"},
        {path: commands[0][2] for path, commands in unit_commands.items()}, timer_running=True,
        modes={"/var/lib/vllm-drift": "drwx------"})
    second, changes = plan(data, converged)
    assert [commands for _, commands in second] == [[]] * 5
    assert changes == 0


def test_new_schedule_reloads_systemd_and_restarts_only_the_timer():
    data = control_data()
    textfile_dir = "/var/lib/prometheus/node-exporter"
    units = render_units(data)
    installed = host_answers(
        {UNIT_DIR: "root", "/var/lib/vllm-drift": "root", textfile_dir: "root"},
        {f"{UNIT_DIR}/{unit}": text for unit, text in units.items()}, timer_running=True,
        modes={"/var/lib/vllm-drift": "drwx------"})
    operations, changes = plan(control_data(drift_schedule="hourly"), installed)
    changed = {name: commands for name, commands in operations if commands}
    timer_path = f"{UNIT_DIR}/{TIMER_UNIT}"
    assert list(changed) == [f"Install {TIMER_UNIT} unit",
                             f"Enable and start {TIMER_UNIT}, reload systemd if a unit changed"]
    upload = changed[f"Install {TIMER_UNIT} unit"][0]
    assert upload[:2] == ("upload", timer_path) and "OnCalendar=hourly\n" in upload[2]
    assert changed[f"Enable and start {TIMER_UNIT}, reload systemd if a unit changed"] == [
        "systemctl daemon-reload", f"systemctl restart {TIMER_UNIT}"]
    assert changes == 2


# (d) Bad data stops the deploy before its first operation, naming host and key.

@pytest.mark.parametrize("key, value", [
    ("drift_repo_dir", "work/kimi-gb200"),  # relative
    ("drift_repo_dir", None),  # the required key left unset
    ("drift_schedule", 15),  # wrong type
    ("drift_schedule", "*/15 * * * *"),  # cron syntax where OnCalendar is read
    ("drift_schedule", "*:0/15\nExecStartPre=/bin/false"),
    ("drift_inventory", "/etc/inventory.py"),
    ("drift_inventory", "../elsewhere/inventory.py"),
    ("drift_out_dir", "/var/lib/vllm drift"),
    ("drift_out_dir", "/var/lib"),  # a shared folder the task would chown
    ("drift_textfile", "/vllm_drift.prom"),
    ("drift_textfile", "/var/lib/prometheus/node-exporter/vllm_drift.txt"),
    ("drift_user", "ops team"),
    ("drift_report_mode", 0o755),  # execute bits: a report is no program
    ("drift_report_mode", 0o1600),
    ("drift_report_mode", -1),
    ("drift_report_mode", True),
    ("drift_report_mode", "0600"),  # a string, where Python's 0o600 is meant
])
def test_bad_data_raises_data_error_naming_host_and_key(key, value):
    inventory = Inventory(([(FAKE_HOST, control_data(**{key: value}))], {}))
    state = State(inventory, Config())
    connect_all(state)
    with pytest.raises(DataError) as raised:
        add_deploy(state, drift_control.install)
    (problem,) = raised.value.problems
    assert (problem.host, problem.key) == (FAKE_HOST, key), problem
    assert str(problem).startswith(f"{FAKE_HOST}: {key}: found "), problem
    assert state.get_op_order() == []


def test_every_problem_is_reported_at_once():
    with pytest.raises(DataError) as raised:
        read_drift_settings("control", control_data(drift_repo_dir=None, drift_schedule=15,
                                                  drift_user=""))
    assert sorted(problem.key for problem in raised.value.problems) == [
        "drift_repo_dir", "drift_schedule", "drift_user"]


def test_the_report_mode_sets_the_folder_mode_with_search_bits():
    """0o644 opens the folder for listing (0755); the default keeps it the owner's (0700)."""
    data = control_data(drift_report_mode=0o644)
    operations, _ = plan(data, host_answers({UNIT_DIR: "root"}, {}, timer_running=False))
    assert operations[0][1][1] == "chmod 755 /var/lib/vllm-drift"
    for mode, folder in ((0o600, 0o700), (0o640, 0o750), (0o644, 0o755), (0o000, 0o700)):
        assert read_drift_settings("control", control_data(drift_report_mode=mode)
                                 ).out_dir_mode == folder


# (e) drift-check: no secret in any report, reports private by default.

KEY = "sk-drift-UNIT-TEST-0123456789abcdef"


def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class RefusingServer(http.server.BaseHTTPRequestHandler):
    """A stand-in for a vLLM that holds another key, as during a key rotation (vLLM itself
    does not run on this machine): /health answers, everything else is 401."""

    def answer(self):
        status = 200 if self.path == "/health" else 401
        body = b"{}" if status == 200 else b'{"error": "Unauthorized"}'
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = answer

    def log_message(self, *args):
        pass


@pytest.fixture
def refusing_port():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), RefusingServer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def local_inventory(tmp_path: Path, folders: dict, port: int, **data) -> Path:
    """An inventory of this machine (@local: the infra checks use testinfra's local backend)
    whose vLLM listens on ``port`` of 127.0.0.1, with a recognisable API key: the endpoint
    checks fail, and each failure would print whatever it holds."""
    key_file = tmp_path / "api-key"
    key_file.write_text(KEY + "\n")
    data = {**folders, "model_profile": "sandbox-tiny", "vllm_host": "127.0.0.1",
            "vllm_port": port, "vllm_api_key_file": str(key_file),
            "weights_dir": str(tmp_path / "weights"), **data}
    inventory = tmp_path / "inventory.py"
    inventory.write_text(f"local = [('@local', {data!r})]\n")
    return inventory


def test_failing_endpoint_checks_leave_no_key_in_the_reports(tmp_path, controller_folders):
    """The whole tool on this machine: the deploy's dry run and the infra checks, for real.
    The checks fail on the closed port (refused) and on the absent service; the model folder
    holds the controller's copy and a file nobody declared, which both looks report."""
    inventory = local_inventory(tmp_path, controller_folders, closed_port())
    model = tmp_path / "weights" / "tiny-kimi"
    model.mkdir(parents=True)
    shutil.copy(Path(controller_folders["model_source_dir"]) / "config.json", model)
    (model / "notes.txt").write_text("mine\n")
    out = tmp_path / "drift"
    result = subprocess.run([sys.executable, "-m", "tools.drift_check",
                             str(inventory), "--out", str(out)], cwd=REPO,
                            capture_output=True, text=True, timeout=300,
                            stdin=subprocess.DEVNULL)
    assert result.returncode == 1, result.stdout + result.stderr
    report = json.loads((out / "report.json").read_text())
    failed = {check["check"]: check["message"]
              for check in report["hosts"]["@local"]["failed_checks"]}
    assert "no answer: ConnectionRefusedError" in failed["test_chat_completion_answers[@local]"]
    assert failed["test_weights_folders_hold_only_declared_files[@local]"].endswith(
        f"{model} holds files the deploy did not place: notes.txt")
    assert (f"Model weights | Place sandbox-tiny weights in {model}"
            in report["hosts"]["@local"]["changed_operations"])
    for text in (result.stdout, result.stderr, (out / "report.json").read_text(),
                 (out / "junit.xml").read_text(), (out / "drift.prom").read_text()):
        assert KEY not in text
    assert {path.name: stat.S_IMODE(path.stat().st_mode) for path in out.iterdir()} == {
        "report.json": 0o600, "junit.xml": 0o600, "drift.prom": 0o644}
    assert stat.S_IMODE(out.stat().st_mode) == 0o700


@pytest.mark.parametrize("server, traceback", [("closed", "long"), ("refusing", "long"),
                                               ("refusing", "native")])
def test_the_infra_checks_never_print_the_key(tmp_path, controller_folders, request, server,
                                              traceback):
    """tests/infra alone, at the loudest settings (-vv; -l shows every frame's locals; the
    captured output in the XML), with no scrubbing after it: the key is held only as a
    Secret, which prints redacted, and a request that gets no answer fails without frames."""
    port = request.getfixturevalue("refusing_port") if server == "refusing" else closed_port()
    inventory = local_inventory(tmp_path, controller_folders, port)
    junit = tmp_path / "junit.xml"
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "tests/infra", f"--inventory={inventory}",
         "-k", "endpoint", "-vv", "-l", f"--tb={traceback}", "-p", "no:cacheprovider",
         f"--junitxml={junit}", "-o", "junit_family=xunit1", "-o", "junit_logging=all"],
        cwd=REPO, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert result.returncode == 1, result.stdout[-3000:]
    assert "FAILED tests/infra/test_endpoint.py::test_models_lists_the_served_name" in \
        result.stdout
    assert KEY not in result.stdout + result.stderr
    assert KEY not in junit.read_text()
    if (server, traceback) == ("refusing", "long"):  # a 401 fails an assert: frames printed
        assert "api_key = Secret(<redacted>)" in result.stdout


def test_a_leaked_secret_is_scrubbed_from_every_report(tmp_path, monkeypatch):
    """Defence in depth: a secret that reached a check's output anyway (escaped for XML, in
    an attribute and in text) is replaced before anything is written."""
    tool = drift_check
    key_file = tmp_path / "key"
    key_file.write_text('k&"<ey>-0123\n')
    monkeypatch.setenv("HF_TOKEN", "hf_token_in_the_environment")
    secrets = tool.known_secrets({"h1": {"vllm_api_key_file": str(key_file),
                                         "weights_hf_token_file": str(tmp_path / "none"),
                                         "ssh_key": str(key_file), "vllm_port": 8000}})
    assert secrets == {'k&"<ey>-0123', "hf_token_in_the_environment"}
    raw = tmp_path / "raw.xml"
    raw.write_text('<testsuite><testcase name="t"><failure message="Bearer k&amp;&quot;&lt;ey'
                   '&gt;-0123">headers = {"Authorization": "Bearer k&amp;"&lt;ey&gt;-0123"} '
                   'hf_token_in_the_environment</failure></testcase></testsuite>')
    hosts = {"h1": {"status": "drift", "changed_operations": [], "reason": "",
                    "failed_checks": [{"check": "t", "message": 'Bearer k&"<ey>-0123'}]}}
    cases = tool.add_plan_cases(raw, hosts)
    tool.scrub_xml(cases, secrets)
    report = tool.scrub({"hosts": hosts, "finished": 0.0, "exit_code": 1,
                         "errors": ["pyinfra: hf_token_in_the_environment"]}, secrets)
    out = tmp_path / "out"
    tool.write_reports(report, cases, out, None, 0o640)
    for name in ("report.json", "junit.xml"):
        text = (out / name).read_text()
        assert "0123" not in text and "hf_token" not in text, text
        assert tool.REDACTED in text or "&lt;redacted&gt;" in text
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o640
    assert stat.S_IMODE(out.stat().st_mode) == 0o750


@pytest.mark.parametrize("text, mode", [("600", 0o600), ("0640", 0o640), ("0o644", 0o644),
                                        ("0", 0)])
def test_report_mode_argument_reads_octal(text, mode):
    assert drift_check.report_mode_argument(text) == mode


@pytest.mark.parametrize("text", ["755", "1600", "rw", "-600", "8"])
def test_report_mode_argument_refuses_execute_bits_and_junk(text):
    with pytest.raises(argparse.ArgumentTypeError, match="without execute bits"):
        drift_check.report_mode_argument(text)


def test_an_unreachable_host_is_recognised_whatever_the_padding_of_its_name():
    """pyinfra pads each `[name]` to the longest name of the inventory (captured from a
    sandbox of t1, t2 and the router tr1 with t1's veth down)."""
    output = ("--> Connecting to hosts...\n"
              "    [t1]  Could not connect ([Errno None] Unable to connect to port 22 on "
              "10.213.1.2)\n    [tr1] Connected\n    [t2]  Connected\n")
    found = {match.group(1): match.group(0).strip()
             for match in drift_check.UNREACHABLE.finditer(output)}
    assert found == {"t1": "[t1]  Could not connect ([Errno None] Unable to connect to port "
                           "22 on 10.213.1.2)"}
