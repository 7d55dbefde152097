"""The sandbox's (harness/sandbox.py) liveness checks, on real child processes (no nspawn needed).

A fresh machine's `make demo` failed at `sandbox up` with "veth ve-sbx1 never appeared" while
nspawn was booting: the tool judged its own child by /proc/PID/cmdline, which can read empty
while the child's exec completes. A child is now asked through its Popen; a host booted by an
earlier run is matched by PID and start time.
"""

import subprocess
import sys

import pytest

from harness import sandbox


@pytest.fixture
def child():
    """A real child process that is not systemd-nspawn: its /proc cmdline says `sleep`."""
    process = subprocess.Popen(["sleep", "60"])
    yield process
    if process.poll() is None:
        process.kill()
        process.wait()


@pytest.fixture(autouse=True)
def no_children():
    sandbox._children.clear()
    yield
    sandbox._children.clear()


def host_of(process, name="t1") -> dict:
    return {"name": name, "pid": process.pid, "merged": "/nonexistent/merged",
            "controller_address": "10.213.250.1"}


def test_a_child_of_ours_is_running_whatever_proc_says(child):
    host = host_of(child)
    sandbox._children[host["name"]] = child
    assert sandbox.host_running(host)


def test_a_child_that_exited_is_reported_with_its_exit_status(capsys):
    process = subprocess.Popen([sys.executable, "-c", "import sys; sys.exit(3)"])
    process.wait()
    host = host_of(process)
    sandbox._children[host["name"]] = process
    with pytest.raises(SystemExit):
        sandbox.configure_controller_end(host, deadline=float("inf"))
    error = capsys.readouterr().err
    assert "systemd-nspawn exited with status 3 before veth ve-t1 appeared" in error


def test_a_running_child_is_waited_for_until_the_deadline(child, capsys):
    host = host_of(child)
    sandbox._children[host["name"]] = child
    with pytest.raises(SystemExit):
        sandbox.configure_controller_end(host, deadline=0)
    assert "veth ve-t1 never appeared" in capsys.readouterr().err
    assert child.poll() is None


def test_a_host_of_an_earlier_run_is_matched_by_pid_and_start_time(child):
    host = {**host_of(child), "pid_start": sandbox.process_start_time(child.pid)}
    assert host["pid_start"] is not None
    assert sandbox.host_running(host)
    # The same PID with another start time is a recycled PID: not our host.
    assert not sandbox.host_running({**host, "pid_start": host["pid_start"] - 1})


def test_an_ended_process_is_not_running(child):
    host = {**host_of(child), "pid_start": sandbox.process_start_time(child.pid)}
    child.kill()
    child.wait()
    assert sandbox.process_start_time(child.pid) is None
    assert not sandbox.host_running(host)


def test_a_zombie_is_not_running():
    process = subprocess.Popen(["true"])
    # Not reaped: the exited child stays a zombie, which /proc still lists.
    for _ in range(200):
        if sandbox.process_start_time(process.pid) is None:
            break
        subprocess.run(["sleep", "0.01"])
    assert sandbox.process_start_time(process.pid) is None
    process.wait()
