"""harness/gpu_hardened.py: vllm.service's sandbox rebuilt by hand, checked from inside.

The GPU machine has no systemd, so the probe stands in for the unit's sandboxing there. Here
(root, no GPU) it runs a small Python program of this file's own as the command, which reports
what it can and cannot do; each test reads one part of that report. The program runs under a
system python3 outside /root and /home: the probe hides those, as ProtectHome=yes does.

Needs root (the probe mounts, drops capabilities and changes user); CI runs as root.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from harness import gpu_hardened
from tools.repository import REPO

TEMPLATE = REPO / "templates" / "vllm.service.j2"
HOMES = ("/root", "/home")

# The command run inside: standard library only, every answer an errno name or a value.
INSIDE = r"""
import ctypes, errno, json, os, socket, subprocess, sys, threading

libc = ctypes.CDLL(None, use_errno=True)

def failure(call):
    try:
        call()
    except OSError as error:
        return errno.errorcode[error.errno]
    return None

def libc_failure(result):
    return errno.errorcode[ctypes.get_errno()] if result == -1 else None

def create(path):
    os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))

class Timespec(ctypes.Structure):
    _fields_ = [("seconds", ctypes.c_long), ("nanoseconds", ctypes.c_long)]

now = Timespec(1_700_000_000, 0)
status = dict(line.split(":\t", 1) for line in open("/proc/self/status").read().splitlines()
              if ":\t" in line)
seen = {key: status[key].strip() for key in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb",
                                              "NoNewPrivs", "Seccomp")}
mask = os.umask(0)
os.umask(mask)
seen.update(uid=os.getuid(), euid=os.geteuid(), gid=os.getgid(), groups=os.getgroups(),
            umask=mask, cwd=os.getcwd(), environment=dict(os.environ))
seen["create_usr"] = failure(lambda: create("/usr/.gpu-hardened-test"))
seen["create_repo"] = failure(lambda: create(sys.argv[1] + "/.gpu-hardened-test"))
seen["tmp_listing"] = sorted(os.listdir("/tmp"))
seen["create_tmp"] = failure(lambda: create("/tmp/inside"))
seen["tmp_file_mode"] = os.stat("/tmp/inside").st_mode & 0o777
seen["create_home"] = failure(lambda: create(os.environ["HOME"] + "/state"))
seen["list_root"] = failure(lambda: os.listdir("/root"))
seen["mount"] = libc_failure(libc.mount(b"tmpfs", os.environ["HOME"].encode(), b"tmpfs", 0, None))
seen["clock_settime"] = libc_failure(libc.clock_settime(0, ctypes.byref(now)))
seen["settimeofday"] = libc_failure(libc.settimeofday(ctypes.byref(now), None))
# Allowed to any user, refused by the filter alone:
seen["chown_own_file"] = failure(lambda: os.chown("/tmp/inside", os.getuid(), os.getgid()))
seen["setuid_self"] = failure(lambda: os.setuid(os.getuid()))
seen["personality_linux32"] = libc_failure(libc.personality(0x0008))
seen["unshare_user"] = libc_failure(libc.unshare(0x10000000))
seen["clone3"] = libc_failure(libc.syscall(435, None, 0))
seen["af_packet"] = failure(lambda: socket.socket(17, socket.SOCK_RAW).close())
seen["af_unix"] = failure(lambda: socket.socket(socket.AF_UNIX).close())
seen["af_inet"] = failure(lambda: socket.socket(socket.AF_INET).close())
seen["af_netlink"] = failure(lambda: socket.socket(16, socket.SOCK_RAW, 0).close())
thread = threading.Thread(target=lambda: None)
thread.start()
thread.join()
seen["thread_started"] = True
seen["subprocess"] = subprocess.run(["true"]).returncode
print(json.dumps(seen))
"""


def need_root() -> None:
    if os.geteuid() != 0:
        pytest.fail("harness/gpu_hardened.py mounts, drops capabilities and changes user: "
                    "these tests need root (CI runs them as root)")


def inner_python() -> str:
    """A python3 the service user can run: outside /root and /home, executable by others."""
    for candidate in (os.path.realpath(sys.executable), "/usr/bin/python3",
                      "/usr/local/bin/python3"):
        real = os.path.realpath(candidate)
        if (os.path.isfile(real) and not gpu_hardened.under(real, HOMES)
                and os.stat(real).st_mode & 0o001):
            return real
    pytest.fail("no python3 outside /root and /home that any user may run: install python3")


def probe(*arguments: str) -> subprocess.CompletedProcess:
    need_root()
    return subprocess.run([sys.executable, "-m", "harness.gpu_hardened", *arguments], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def outer_tmp_file():
    with tempfile.NamedTemporaryFile(dir="/tmp", prefix="gpu-hardened-outer-") as marker:
        yield marker.name


@pytest.fixture(scope="module")
def inside(outer_tmp_file) -> dict:
    result = probe("--", inner_python(), "-I", "-c", INSIDE, str(REPO))
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout)
    seen["stderr"] = result.stderr
    return seen


def test_the_command_runs_as_the_transient_unprivileged_user(inside):
    assert (inside["uid"], inside["euid"], inside["gid"]) == (61875, 61875, 61875)
    assert inside["groups"] == []


def test_the_system_and_the_repository_are_read_only(inside):
    assert inside["create_usr"] == "EROFS"
    # A clone under a home is hidden by ProtectHome first; one under /tmp is not there at all
    # (PrivateTmp: a fresh tmpfs).
    if gpu_hardened.under(str(REPO), gpu_hardened.PRIVATE_TMP):
        assert inside["create_repo"] == "ENOENT"
    else:
        hidden = gpu_hardened.under(str(REPO), HOMES)
        assert inside["create_repo"] == ("EACCES" if hidden else "EROFS")


def test_tmp_is_a_private_writable_tmpfs(inside, outer_tmp_file):
    assert os.path.exists(outer_tmp_file)
    assert inside["tmp_listing"] == []
    assert inside["create_tmp"] is None


def test_files_are_created_with_umask_0077(inside):
    assert inside["umask"] == 0o077
    assert inside["tmp_file_mode"] == 0o600


def test_root_and_home_are_hidden(inside):
    assert inside["list_root"] == "EACCES"


def test_the_state_folder_is_writable_and_the_units_variables_point_into_it(inside):
    assert inside["cwd"] == "/var/lib/vllm"
    assert inside["create_home"] is None
    for name, value in {**gpu_hardened.FOLDERS, **gpu_hardened.SYSTEMD_VARIABLES}.items():
        assert inside["environment"][name] == value, name


def test_mount_and_clock_calls_fail_with_eperm(inside):
    assert inside["mount"] == "EPERM"
    assert inside["clock_settime"] == "EPERM"
    assert inside["settimeofday"] == "EPERM"


def test_calls_any_user_may_make_are_refused_by_the_filter(inside):
    """Each of these works for an unprivileged user without the filter."""
    assert inside["chown_own_file"] == "EPERM"  # @chown, within @privileged
    assert inside["setuid_self"] == "EPERM"  # @privileged
    assert inside["personality_linux32"] == "EPERM"  # LockPersonality=yes


def test_only_the_units_address_families_open_sockets(inside):
    assert inside["af_packet"] == "EAFNOSUPPORT"
    assert (inside["af_unix"], inside["af_inet"], inside["af_netlink"]) == (None, None, None)


def test_new_namespaces_are_refused_and_threads_and_children_still_start(inside):
    assert inside["unshare_user"] == "EPERM"
    assert inside["clone3"] == "ENOSYS"  # as systemd: glibc falls back to clone()
    assert inside["thread_started"] is True
    assert inside["subprocess"] == 0


def test_no_capabilities_and_no_new_privileges(inside):
    for key in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(inside[key], 16) == 0, key
    assert inside["NoNewPrivs"] == "1"
    assert inside["Seccomp"] == "2"


def test_each_restriction_is_reported_on_its_own_line(inside):
    lines = [line for line in inside["stderr"].splitlines() if line.startswith("gpu-hardened: ")]
    for directive in ("ProtectSystem=strict", "PrivateTmp=yes", "ProtectHome=yes",
                      "StateDirectory=", "UMask=0077", "CapabilityBoundingSet=",
                      "DynamicUser=yes", "NoNewPrivileges=yes", "SystemCallArchitectures=native",
                      "SystemCallFilter=~@clock", "ProtectKernelLogs=yes",
                      "RestrictAddressFamilies=", "RestrictNamespaces=yes",
                      "RestrictRealtime=yes", "LockPersonality=yes"):
        assert sum(directive in line for line in lines) == 1, directive
    assert "REFUSED" not in inside["stderr"]


def test_the_commands_exit_status_is_returned():
    assert probe("--", "/bin/sh", "-c", "exit 7").returncode == 7
    missing = probe("--", "/nonexistent/command")
    assert missing.returncode == 127, missing.stderr


def test_weights_are_checked_to_be_read_only():
    read_only = probe("--weights", "/usr/share", "--", "/bin/true")
    assert read_only.returncode == 0, read_only.stderr
    assert "weights /usr/share: read-only mount, readable by uid 61875" in read_only.stderr
    writable = probe("--weights", "/tmp", "--", "/bin/true")
    assert writable.returncode == gpu_hardened.EXIT_REFUSED
    assert "--weights /tmp is on a writable mount" in writable.stderr


def test_nested_groups_are_expanded():
    assert "mount" in gpu_hardened.expand("@mount")
    assert "init_module" in gpu_hardened.expand("@module")
    assert "settimeofday" in gpu_hardened.expand("@clock")
    privileged = gpu_hardened.expand("@privileged")
    assert {"chown", "settimeofday", "init_module", "reboot", "setuid"} <= set(privileged)
    assert not any(name.startswith("@") for name in privileged)


def unit_setting(key: str) -> str:
    found = re.findall(rf"^{key}=(.*)$", TEMPLATE.read_text(), flags=re.MULTILINE)
    assert len(found) == 1, key
    return found[0]


def test_the_probe_filters_what_the_unit_filters():
    assert unit_setting("SystemCallFilter") == "~" + " ".join(gpu_hardened.SERVICE_SYSCALL_FILTER)
    assert unit_setting("SystemCallErrorNumber") == "EPERM"
    assert unit_setting("RestrictAddressFamilies").split() == list(
        gpu_hardened.SERVICE_ADDRESS_FAMILIES)
    assert int(unit_setting("UMask"), 8) == gpu_hardened.UMASK
    assert int(unit_setting("LimitNOFILE")) == gpu_hardened.OPEN_FILES
    assert unit_setting("WorkingDirectory") == gpu_hardened.STATE_DIR


def test_every_hardening_directive_of_the_unit_is_accounted_for_in_the_docstring():
    """A directive added to the unit must be reproduced, or said not to be."""
    hardening = TEMPLATE.read_text().split("# Hardening", 1)[1].split("\n\n", 1)[0]
    directives = re.findall(r"^(\w+)=", hardening, flags=re.MULTILINE) + ["DynamicUser"]
    missing = [name for name in directives if f"{name}=" not in gpu_hardened.__doc__]
    assert len(directives) > 15 and missing == []


def test_the_folders_are_the_units():
    from tasks.vllm_service import SERVICE_ENVIRONMENT
    folders = {name: value for name, value in SERVICE_ENVIRONMENT.items()
               if value.startswith("/var/")}
    assert gpu_hardened.FOLDERS == folders


def test_the_view_reports_this_process_as_it_is(tmp_path):
    """Outside the probe: root, and a writable folder stays writable (and clean)."""
    view = gpu_hardened.sandbox_view(str(tmp_path))
    assert view["Uid"].split()[0] == str(os.geteuid())
    assert view["create_under_probe"] is None and list(tmp_path.iterdir()) == []
    mask = os.umask(0)
    os.umask(mask)
    assert view["umask"] == f"{mask:04o}"
    assert Path(view["cwd"]) == Path.cwd()
