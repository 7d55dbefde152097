"""Run a command inside vllm.service's sandbox rebuilt by hand: a stand-in for systemd's own.

    python3 -m harness.gpu_hardened [--weights DIR] [--hide-gpus] [--keep-home]
                                    [--tolerate-refusal] -- CMD...          (as root)
    python3 -m harness.gpu_hardened --cuda-workload    # the GPU check to run as CMD
    python3 -m harness.gpu_hardened --print-groups     # regenerate SYSCALL_GROUPS below

templates/vllm.service.j2 confines vLLM with systemd's sandboxing. The project's GPU machine
(a gVisor sandbox or a Firecracker microVM) has no systemd as PID 1, so nothing there can
start the unit; this probe applies the same restrictions with Linux primitives, in a child
process, and then execs CMD (exit status: CMD's; 125 when a restriction could not be
applied; 126/127 when CMD could not be run). Use it only where systemd cannot run: on a host
with systemd the unit itself, and `systemd-analyze security vllm.service`, are the truth
(tests/infra/test_service.py).

CMD runs as the service user with /root and /home hidden (and /dev replaced under
--hide-gpus), so give it files from elsewhere: the workload is run as a copy of this file,
`python3 /opt/probe/gpu_hardened.py --cuda-workload`, which its CUDA IPC child re-imports.

In order, each step printing one line to stderr, named after the directive it reproduces:

    unshare(CLONE_NEWNS), / made private      the service's own mount namespace
    every mount but /dev, /proc, /sys         ProtectSystem=strict (DynamicUser= implies it);
      bind-remounted read-only, one by one      --weights DIR is checked to be read-only
    fresh tmpfs on /tmp and /var/tmp          PrivateTmp=yes
    tmpfs on /dev: null, zero, full, random,  PrivateDevices=yes: only with --hide-gpus, the
      urandom, tty, shm (no /dev/nvidia*)       negative control; the unit leaves it off
    empty mode-000 tmpfs on /home, /root,     ProtectHome=yes (not with --keep-home: for an
      /run/user                                 interpreter installed under /root)
    tmpfs /var/lib/vllm, /var/cache/vllm      StateDirectory=vllm, CacheDirectory=vllm,
      owned by the service user; chdir there    WorkingDirectory=/var/lib/vllm, and the unit's
      HOME, XDG_CACHE_HOME, ... (FOLDERS)        folder variables (tasks/vllm_service.py)
    umask 0077; RLIMIT_NOFILE 65536           UMask=0077, LimitNOFILE=65536
    PR_CAPBSET_DROP of every capability,      CapabilityBoundingSet= (empty)
      ambient set cleared
    setgroups([]), setresgid/setresuid 61875  DynamicUser=yes (a transient unprivileged uid)
      and capset(0): no inheritable caps
    PR_SET_NO_NEW_PRIVS                       NoNewPrivileges=yes
    seccomp (libseccomp.so.2 via ctypes),     SystemCallFilter=~@clock ... @swap with
      default allow, native arch only           SystemCallErrorNumber=EPERM;
                                                SystemCallArchitectures=native;
                                                RestrictAddressFamilies= (socket() only, as
                                                systemd); RestrictNamespaces=yes (clone3 gets
                                                ENOSYS, as systemd does); RestrictRealtime=yes;
                                                LockPersonality=yes; syslog() for
                                                ProtectKernelLogs=

Approximately covered: ProtectKernelModules= (the @module filter and no CAP_SYS_MODULE, as
the unit; /usr/lib/modules is not hidden); ProtectKernelLogs= (syslog() refused, no
CAP_SYSLOG; /dev/kmsg and /proc/kmsg are not hidden); ProtectKernelTunables= and
ProtectControlGroups= (/proc/sys, /sys and /sys/fs/cgroup stay writable mounts, left only to
file permissions: writable by root, which the service user is not); ProtectHostname=
(sethostname and setdomainname refused by @privileged; no UTS namespace of its own).
Not reproduced: ProtectProc=invisible (other users' processes stay visible in /proc),
RemoveIPC=, RestrictSUIDSGID= (no filter on set-uid modes; NoNewPrivileges makes such bits
inert anyway), LoadCredential= and EnvironmentFile= (no secrets here), the clean environment
a unit starts with (CMD keeps the caller's variables, the unit's folders on top), the user
name service of DynamicUser= (USER and LOGNAME are set; getpwuid(61875) may still fail), and
the cgroup, journal and restart policy.

The seccomp groups are systemd's, expanded from nested groups at run time (@privileged holds
@chown, @clock, ...). Names that the running libseccomp does not know, or that have no
number on this architecture (chown32, vm86, ...), are skipped and counted, as systemd does.
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import json
import os
import re
import resource
import shlex
import signal
import socket
import subprocess
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path

SERVICE_UID = SERVICE_GID = 61875  # any uid no account holds, like DynamicUser='s
SERVICE_USER = "vllm"
STATE_DIR = "/var/lib/vllm"
CACHE_DIR = "/var/cache/vllm"
# The unit's folder variables (tasks/vllm_service.py SERVICE_ENVIRONMENT; a test keeps them in
# step) and what systemd itself sets for StateDirectory=, CacheDirectory= and the user.
FOLDERS = {
    "HOME": STATE_DIR,
    "XDG_CACHE_HOME": CACHE_DIR,
    "VLLM_CACHE_ROOT": f"{CACHE_DIR}/vllm",
    "TORCHINDUCTOR_CACHE_DIR": f"{CACHE_DIR}/inductor",
    "TMPDIR": CACHE_DIR,
}
SYSTEMD_VARIABLES = {"STATE_DIRECTORY": STATE_DIR, "CACHE_DIRECTORY": CACHE_DIR,
                     "USER": SERVICE_USER, "LOGNAME": SERVICE_USER}
UMASK = 0o077
OPEN_FILES = 65536
# systemd leaves these API filesystems as they are under ProtectSystem=strict.
API_FILESYSTEMS = ("/dev", "/proc", "/sys")
PRIVATE_TMP = ("/tmp", "/var/tmp")
HOMES = ("/home", "/root", "/run/user")
# What PrivateDevices=yes keeps of /dev (no GPU among them).
PRIVATE_DEVICE_NODES = ("null", "zero", "full", "random", "urandom", "tty")

# The unit's SystemCallFilter= and RestrictAddressFamilies= (a test reads the template).
SERVICE_SYSCALL_FILTER = ("@clock", "@cpu-emulation", "@module", "@mount", "@obsolete",
                          "@privileged", "@raw-io", "@reboot", "@swap")
SERVICE_ADDRESS_FAMILIES = {"AF_UNIX": socket.AF_UNIX, "AF_INET": socket.AF_INET,
                            "AF_INET6": socket.AF_INET6, "AF_NETLINK": 16}
# From `python3 -m harness.gpu_hardened --print-groups`, which runs `systemd-analyze
# syscall-filter GROUP` for each group the filter names, nested ones included; systemd 252
# (252.39-1~deb12u2, Debian 12). A newer systemd may add names; regenerate, don't hand-edit.
SYSCALL_GROUPS = {
    "@chown": ("chown", "chown32", "fchown", "fchown32", "fchownat", "lchown", "lchown32"),
    "@clock": ("adjtimex", "clock_adjtime", "clock_adjtime64", "clock_settime",
               "clock_settime64", "settimeofday"),
    "@cpu-emulation": ("modify_ldt", "subpage_prot", "switch_endian", "vm86", "vm86old"),
    "@module": ("delete_module", "finit_module", "init_module"),
    "@mount": ("chroot", "fsconfig", "fsmount", "fsopen", "fspick", "mount", "mount_setattr",
               "move_mount", "open_tree", "pivot_root", "umount", "umount2"),
    "@obsolete": ("_sysctl", "afs_syscall", "bdflush", "break", "create_module", "ftime",
                  "get_kernel_syms", "getpmsg", "gtty", "idle", "lock", "mpx", "prof",
                  "profil", "putpmsg", "query_module", "security", "sgetmask", "ssetmask",
                  "stime", "stty", "sysfs", "tuxcall", "ulimit", "uselib", "ustat", "vserver"),
    "@privileged": ("@chown", "@clock", "@module", "@raw-io", "@reboot", "@swap", "_sysctl",
                    "acct", "bpf", "capset", "chroot", "fanotify_init", "fanotify_mark",
                    "nfsservctl", "open_by_handle_at", "pivot_root", "quotactl", "quotactl_fd",
                    "setdomainname", "setfsuid", "setfsuid32", "setgroups", "setgroups32",
                    "sethostname", "setresuid", "setresuid32", "setreuid", "setreuid32",
                    "setuid", "setuid32", "vhangup"),
    "@raw-io": ("ioperm", "iopl", "pciconfig_iobase", "pciconfig_read", "pciconfig_write",
                "s390_pci_mmio_read", "s390_pci_mmio_write"),
    "@reboot": ("kexec_file_load", "kexec_load", "reboot"),
    "@swap": ("swapoff", "swapon"),
}

# <linux/sched.h>, <sys/mount.h>, <linux/prctl.h>, <linux/capability.h>, <seccomp.h>
CLONE_NEWNS = 0x00020000
NAMESPACE_FLAGS = {"cgroup": 0x02000000, "ipc": 0x08000000, "net": 0x40000000,
                   "mnt": CLONE_NEWNS, "pid": 0x20000000, "user": 0x10000000,
                   "uts": 0x04000000, "time": 0x00000080}
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 0x1, 0x2, 0x4, 0x8
MS_REMOUNT, MS_NOSYMFOLLOW, MS_NOATIME, MS_NODIRATIME = 0x20, 0x100, 0x400, 0x800
MS_BIND, MS_REC, MS_PRIVATE = 0x1000, 0x4000, 0x40000
MS_RELATIME, MS_STRICTATIME = 0x200000, 0x1000000
MOUNT_OPTION_FLAGS = {"nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC,
                      "noatime": MS_NOATIME, "nodiratime": MS_NODIRATIME,
                      "relatime": MS_RELATIME, "nosymfollow": MS_NOSYMFOLLOW}
MNT_DETACH = 2
PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS, PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 24, 38, 47, 4
CAPABILITY_VERSION_3 = 0x20080522
SCMP_ACT_ALLOW = 0x7FFF0000
SCMP_CMP_NE, SCMP_CMP_EQ, SCMP_CMP_GT, SCMP_CMP_MASKED_EQ = 1, 4, 6, 7
SCMP_NOT_KNOWN = -1  # __NR_SCMP_ERROR; other negative numbers: known, not on this arch
SCHED_IDLE = 5  # RestrictRealtime= allows SCHED_OTHER (0), SCHED_BATCH (3), SCHED_IDLE (5)
PERSONALITY_QUERY = 0xFFFFFFFF

EXIT_REFUSED = 125  # as env(1) and timeout(1): the wrapper failed, not the command


def log(message: str) -> None:
    print(f"gpu-hardened: {message}", file=sys.stderr, flush=True)


class Refused(Exception):
    """A restriction the kernel (or gVisor) would not apply."""


# --- primitives -----------------------------------------------------------------------------

LIBC = ctypes.CDLL(None, use_errno=True)
LIBC.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                       ctypes.c_char_p]
LIBC.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
LIBC.unshare.argtypes = [ctypes.c_int]
LIBC.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                       ctypes.c_ulong]


def checked(result: int, what: str) -> None:
    if result != 0:
        number = ctypes.get_errno()
        raise Refused(f"{what}: {errno.errorcode.get(number, number)} ({os.strerror(number)})")


def encoded(value: str | None) -> bytes | None:
    return None if value is None else value.encode()


def mount(source: str | None, target: str, fstype: str | None, flags: int,
          data: str | None = None) -> None:
    checked(LIBC.mount(encoded(source), encoded(target), encoded(fstype), flags, encoded(data)),
            f"mount({source}, {target}, {fstype}, {flags:#x}, {data})")


def prctl(option: int, argument: int = 0, second: int = 0) -> None:
    checked(LIBC.prctl(option, argument, second, 0, 0), f"prctl({option}, {argument})")


def fresh_tmpfs(path: str, mode: int, owner: int = 0, read_only: bool = False) -> None:
    """An empty tmpfs on ``path``; mode and owner set by chmod/chown, not mount options (gVisor's
    tmpfs options are a subset of Linux's)."""
    flags = MS_NOSUID | MS_NODEV
    mount("tmpfs", path, "tmpfs", flags)
    os.chown(path, owner, owner)
    os.chmod(path, mode)
    if read_only:
        mount(None, path, None, MS_REMOUNT | MS_BIND | MS_RDONLY | flags)


def mounts() -> list[tuple[str, str]]:
    """(mount point, per-mount options) of this mount namespace, from /proc/self/mountinfo."""
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        point = re.sub(r"\\([0-7]{3})", lambda match: chr(int(match.group(1), 8)), fields[4])
        found.append((point, fields[5]))
    return found


def under(path: str, folders: tuple[str, ...]) -> bool:
    return any(path == folder or path.startswith(folder + "/") for folder in folders)


def remount_flags(options: str) -> int:
    """The flags a bind remount must repeat to keep a mount's nosuid, noexec, atime, ..."""
    words = options.split(",")
    flags = sum(MOUNT_OPTION_FLAGS[word] for word in words if word in MOUNT_OPTION_FLAGS)
    return flags if flags & (MS_NOATIME | MS_RELATIME) else flags | MS_STRICTATIME


# --- the mount namespace --------------------------------------------------------------------

def private_mount_namespace() -> str:
    checked(LIBC.unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS)")
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    return "own mount namespace (unshare CLONE_NEWNS), / made private (MS_REC|MS_PRIVATE)"


def state_mount_points() -> str:
    """StateDirectory= and CacheDirectory= need mount points; made now, before / turns
    read-only. systemd creates them on the host too."""
    made = [folder for folder in (STATE_DIR, CACHE_DIR) if not os.path.isdir(folder)]
    for folder in made:
        os.makedirs(folder, mode=0o755)
    return f"mount points {STATE_DIR}, {CACHE_DIR}: " + (
        f"created on the host, removed after ({', '.join(made)})" if made else "already there")


def read_only_system() -> str:
    """Linux ignores MS_REC on a bind remount, so each mount is remounted on its own (systemd's
    bind_remount_recursive does the same), keeping its nosuid/nodev/noexec/atime flags."""
    points = {point: options for point, options in mounts()
              if not under(point, API_FILESYSTEMS)}
    for point in sorted(points):
        flags = MS_REMOUNT | MS_BIND | MS_RDONLY | remount_flags(points[point])
        mount(None, point, None, flags)
    return (f"ProtectSystem=strict: {len(points)} mounts bind-remounted read-only "
            f"({', '.join(API_FILESYSTEMS)} left as they are)")


def private_tmp() -> str:
    for folder in PRIVATE_TMP:
        fresh_tmpfs(folder, 0o1777)
    return f"PrivateTmp=yes: fresh tmpfs on {' and '.join(PRIVATE_TMP)}"


def private_devices() -> str:
    """A /dev without the GPUs: the old nodes are bound in from a view of the old /dev kept
    under the new /tmp, which is then detached (bind and tmpfs only: no mknod)."""
    old = "/tmp/.gpu-hardened-old-dev"
    os.mkdir(old)
    mount("/dev", old, None, MS_BIND | MS_REC)
    mount("tmpfs", "/dev", "tmpfs", MS_NOSUID | MS_NOEXEC, "mode=755")
    kept = [name for name in PRIVATE_DEVICE_NODES if os.path.exists(f"{old}/{name}")]
    for name in kept:
        Path(f"/dev/{name}").touch(mode=0o666)
        mount(f"{old}/{name}", f"/dev/{name}", None, MS_BIND)
    os.mkdir("/dev/shm")
    fresh_tmpfs("/dev/shm", 0o1777)
    os.symlink("/proc/self/fd", "/dev/fd")
    for number, name in enumerate(("stdin", "stdout", "stderr")):
        os.symlink(f"/proc/self/fd/{number}", f"/dev/{name}")
    checked(LIBC.umount2(old.encode(), MNT_DETACH), f"umount2({old}, MNT_DETACH)")
    os.rmdir(old)
    return f"PrivateDevices=yes (--hide-gpus): /dev is a tmpfs with {', '.join(kept)}, shm"


def protect_home() -> str:
    hidden = [folder for folder in HOMES if os.path.isdir(folder)]
    for folder in hidden:
        fresh_tmpfs(folder, 0o000, read_only=True)
    return f"ProtectHome=yes: empty mode-000 read-only tmpfs on {', '.join(hidden)}"


def service_folders() -> str:
    for folder in (STATE_DIR, CACHE_DIR):
        fresh_tmpfs(folder, 0o755, owner=SERVICE_UID)
    os.environ.update(FOLDERS)
    os.environ.update(SYSTEMD_VARIABLES)
    os.chdir(STATE_DIR)
    return (f"StateDirectory=/CacheDirectory=vllm: tmpfs {STATE_DIR} and {CACHE_DIR} owned by "
            f"{SERVICE_UID}; WorkingDirectory={STATE_DIR}; "
            + " ".join(f"{name}={value}" for name, value in FOLDERS.items()))


# --- the process ----------------------------------------------------------------------------

def file_creation_limits() -> str:
    """LimitNOFILE= is a resource limit, not a restriction: where root may not raise the hard
    limit (no CAP_SYS_RESOURCE, as on some CI machines) the lower one is kept and said."""
    os.umask(UMASK)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (OPEN_FILES, OPEN_FILES))
        limit = f"LimitNOFILE={OPEN_FILES}"
    except (ValueError, OSError):
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        limit = f"LimitNOFILE={OPEN_FILES} NOT reproduced: the hard limit {hard} cannot be raised"
    return f"UMask={UMASK:04o}, {limit}"


def empty_bounding_set() -> str:
    last = int(Path("/proc/sys/kernel/cap_last_cap").read_text())
    for capability in range(last + 1):
        prctl(PR_CAPBSET_DROP, capability)
    prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)
    return (f"CapabilityBoundingSet=: capabilities 0..{last} dropped from the bounding set, "
            "ambient set cleared")


class CapabilityHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class CapabilityData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


def dynamic_user() -> str:
    """setresuid from root clears the permitted and effective sets, not the inheritable one:
    capset clears that."""
    os.setgroups([])
    os.setresgid(SERVICE_GID, SERVICE_GID, SERVICE_GID)
    os.setresuid(SERVICE_UID, SERVICE_UID, SERVICE_UID)
    header = CapabilityHeader(CAPABILITY_VERSION_3, 0)
    checked(LIBC.capset(ctypes.byref(header), ctypes.byref((CapabilityData * 2)())), "capset(0)")
    return (f"DynamicUser=yes: uid/gid {SERVICE_UID}, no supplementary groups, "
            "no permitted, effective, inheritable or ambient capabilities")


def no_new_privileges() -> str:
    prctl(PR_SET_NO_NEW_PRIVS, 1)
    return "NoNewPrivileges=yes: PR_SET_NO_NEW_PRIVS"


def weights_read_only(weights: str) -> str:
    if not os.statvfs(weights).f_flag & os.ST_RDONLY:
        raise Refused(f"--weights {weights} is on a writable mount")
    readable = os.access(weights, os.R_OK | os.X_OK)
    return (f"weights {weights}: read-only mount, "
            f"{'readable' if readable else 'NOT readable'} by uid {SERVICE_UID}")


# --- seccomp --------------------------------------------------------------------------------

def expand(group: str) -> list[str]:
    """The system calls of a systemd group, nested groups expanded, sorted."""
    names: set[str] = set()
    for entry in SYSCALL_GROUPS[group]:
        names.update(expand(entry) if entry.startswith("@") else [entry])
    return sorted(names)


@dataclass(frozen=True)
class Rule:
    """One libseccomp rule: ``syscall`` fails with ``error`` when every comparison
    (argument index, SCMP_CMP_*, datum_a, datum_b) holds."""
    directive: str
    syscall: str
    error: int
    comparisons: tuple[tuple[int, int, int, int], ...] = ()


def syscall_filter_rules() -> list[Rule]:
    names = sorted({name for group in SERVICE_SYSCALL_FILTER for name in expand(group)})
    directive = f"SystemCallFilter=~{' '.join(SERVICE_SYSCALL_FILTER)}"
    return ([Rule(directive, name, errno.EPERM) for name in names]
            + [Rule("ProtectKernelLogs=yes", "syslog", errno.EPERM)])


def address_family_rules() -> list[Rule]:
    """systemd's allow-list: families above the highest allowed one, and each one below it
    that is not allowed, make socket() fail with EAFNOSUPPORT."""
    allowed = set(SERVICE_ADDRESS_FAMILIES.values())
    directive = f"RestrictAddressFamilies={' '.join(SERVICE_ADDRESS_FAMILIES)}"
    rules = [Rule(directive, "socket", errno.EAFNOSUPPORT, ((0, SCMP_CMP_GT, max(allowed), 0),))]
    return rules + [Rule(directive, "socket", errno.EAFNOSUPPORT, ((0, SCMP_CMP_EQ, family, 0),))
                    for family in range(max(allowed)) if family not in allowed]


def namespace_rules() -> list[Rule]:
    """systemd's: any namespace flag to unshare or clone, and setns at all, fail with EPERM;
    clone3 (whose flags a filter cannot read) fails with ENOSYS so that glibc falls back to
    clone."""
    directive = "RestrictNamespaces=yes"
    rules = [Rule(directive, "setns", errno.EPERM), Rule(directive, "clone3", errno.ENOSYS)]
    return rules + [Rule(directive, syscall, errno.EPERM, ((0, SCMP_CMP_MASKED_EQ, flag, flag),))
                    for flag in NAMESPACE_FLAGS.values() for syscall in ("unshare", "clone")]


def realtime_rules() -> list[Rule]:
    """systemd's: sched_setscheduler with any policy but SCHED_OTHER, SCHED_BATCH or SCHED_IDLE."""
    refused = [policy for policy in range(SCHED_IDLE) if policy not in (0, 3)]
    return ([Rule("RestrictRealtime=yes", "sched_setscheduler", errno.EPERM,
                  ((1, SCMP_CMP_EQ, policy, 0),)) for policy in refused]
            + [Rule("RestrictRealtime=yes", "sched_setscheduler", errno.EPERM,
                    ((1, SCMP_CMP_GT, SCHED_IDLE, 0),))])


def personality_rules() -> list[Rule]:
    """systemd's: personality() with anything but the current personality fails."""
    current = LIBC.personality(ctypes.c_ulong(PERSONALITY_QUERY)) & 0xFFFFFFFF
    return [Rule("LockPersonality=yes", "personality", errno.EPERM,
                 ((0, SCMP_CMP_NE, current, 0),))]


def service_rules() -> list[Rule]:
    return (syscall_filter_rules() + address_family_rules() + namespace_rules()
            + realtime_rules() + personality_rules())


class ArgumentComparison(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int), ("datum_a", ctypes.c_uint64),
                ("datum_b", ctypes.c_uint64)]


class LibseccompVersion(ctypes.Structure):
    _fields_ = [("major", ctypes.c_uint), ("minor", ctypes.c_uint), ("micro", ctypes.c_uint)]


def libseccomp() -> ctypes.CDLL:
    try:
        library = ctypes.CDLL("libseccomp.so.2", use_errno=True)
    except OSError as error:
        raise Refused(f"libseccomp.so.2 not found ({error}): no system call filter") from None
    library.seccomp_init.restype = ctypes.c_void_p
    library.seccomp_init.argtypes = [ctypes.c_uint32]
    library.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    library.seccomp_rule_add_exact_array.argtypes = [
        ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint,
        ctypes.POINTER(ArgumentComparison)]
    library.seccomp_load.argtypes = [ctypes.c_void_p]
    library.seccomp_release.argtypes = [ctypes.c_void_p]
    library.seccomp_version.restype = ctypes.POINTER(LibseccompVersion)
    return library


def add_rule(library: ctypes.CDLL, context: int, rule: Rule) -> str:
    """'added', 'unknown' (libseccomp does not know the name) or 'not native' (no number on
    this architecture): systemd skips the last two the same way."""
    number = library.seccomp_syscall_resolve_name(rule.syscall.encode())
    if number == SCMP_NOT_KNOWN:
        return "unknown"
    if number < 0:
        return "not native"
    comparisons = (ArgumentComparison * max(1, len(rule.comparisons)))(*rule.comparisons)
    action = 0x00050000 | rule.error  # SCMP_ACT_ERRNO(error)
    result = library.seccomp_rule_add_exact_array(context, action, number,
                                                  len(rule.comparisons), comparisons)
    if result == -errno.EDOM:
        return "not native"
    if result != 0:
        raise Refused(f"seccomp_rule_add({rule.syscall}): {os.strerror(-result)}")
    return "added"


def seccomp_filter() -> list[str]:
    """Default allow, only the native architecture (seccomp_init's default; another one's calls
    are killed), each rule's calls failing with its errno. One line per directive."""
    library = libseccomp()
    version = library.seccomp_version().contents
    context = library.seccomp_init(SCMP_ACT_ALLOW)
    outcomes: dict[str, dict[str, list[str]]] = {}
    try:
        for rule in service_rules():
            outcome = add_rule(library, context, rule)
            outcomes.setdefault(rule.directive, {}).setdefault(outcome, []).append(rule.syscall)
        result = library.seccomp_load(context)
        if result != 0:
            raise Refused(f"seccomp_load: {os.strerror(-result)}")
    finally:
        library.seccomp_release(context)
    lines = [f"SystemCallArchitectures=native: libseccomp {version.major}.{version.minor}."
             f"{version.micro} filter loaded, native architecture only, default allow"]
    for directive, by_outcome in outcomes.items():
        added = sorted(set(by_outcome.get("added", [])))
        skipped = [f"{len(set(names))} {outcome} skipped ({', '.join(sorted(set(names)))})"
                   for outcome, names in sorted(by_outcome.items()) if outcome != "added"]
        lines.append(f"{directive}: {len(by_outcome.get('added', []))} rule(s) on "
                     f"{len(added)} syscall(s); " + ("; ".join(skipped) or "none skipped"))
    return lines


# --- the probe ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Options:
    command: list[str]
    weights: str | None = None
    hide_gpus: bool = False
    keep_home: bool = False
    tolerate_refusal: bool = False


def steps(options: Options) -> list:
    """The restrictions in the order they must be applied: mounts while root, the bounding
    set while CAP_SETPCAP is held, the user, then no_new_privs, which the filter needs."""
    chosen = [private_mount_namespace, state_mount_points, read_only_system, private_tmp]
    chosen += [private_devices] if options.hide_gpus else []
    chosen += [] if options.keep_home else [protect_home]
    chosen += [service_folders, file_creation_limits, empty_bounding_set, dynamic_user,
               no_new_privileges]
    if options.weights:
        def weights_checked() -> str:
            return weights_read_only(options.weights)
        chosen.append(weights_checked)
    return chosen + [seccomp_filter]


def apply(options: Options) -> None:
    for step in steps(options):
        try:
            done = step()
        except (Refused, OSError) as error:
            if not options.tolerate_refusal:
                raise Refused(f"{step.__name__}: {error}") from None
            log(f"REFUSED, carrying on without it (--tolerate-refusal): {step.__name__}: {error}")
            continue
        for line in [done] if isinstance(done, str) else done:
            log(line)


def child(options: Options) -> None:
    """Never returns: execs the command, or exits 125/126/127."""
    try:
        apply(options)
    except Refused as error:
        log(f"REFUSED: {error}")
        os._exit(EXIT_REFUSED)
    log("exec " + shlex.join(options.command).replace("\n", "\\n"))
    try:
        os.execvp(options.command[0], options.command)
    except OSError as error:
        log(f"cannot run {options.command[0]}: {error}")
        os._exit(127 if isinstance(error, FileNotFoundError) else 126)


def exit_status(wait_status: int) -> int:
    code = os.waitstatus_to_exitcode(wait_status)
    return 128 - code if code < 0 else code


def run(options: Options) -> int:
    """Fork; the child applies the restrictions and execs; the parent forwards signals and
    returns the command's exit status (128+N for signal N, as a shell reports it)."""
    sys.stderr.flush()
    made = [folder for folder in (STATE_DIR, CACHE_DIR) if not os.path.exists(folder)]
    pid = os.fork()
    if pid == 0:
        try:
            child(options)
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(EXIT_REFUSED)
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, lambda number, frame: os.kill(pid, number))
    _, wait_status = os.waitpid(pid, 0)
    for folder in made:  # mount points state_mount_points made: leave the host as it was
        try:
            os.rmdir(folder)
        except OSError:
            pass
    return exit_status(wait_status)


# --- what a process inside sees, and the GPU workload --------------------------------------

def sandbox_view(read_only_probe: str = "/usr") -> dict:
    """Identity and restrictions as the calling process sees them, touching nothing: the
    status lines, the umask, and the errno of creating a file under ``read_only_probe``
    (removed again if that worked) and of socket(AF_PACKET) (None: it worked)."""
    status = dict(line.split(":\t", 1) for line in Path("/proc/self/status").read_text()
                  .splitlines() if ":\t" in line)
    view = {key: status[key].strip() for key in ("Uid", "Gid", "Groups", "CapInh", "CapPrm",
                                                  "CapEff", "CapBnd", "CapAmb", "NoNewPrivs",
                                                  "Seccomp") if key in status}
    mask = os.umask(0)
    os.umask(mask)
    view.update(umask=f"{mask:04o}", cwd=os.getcwd(), create_under_probe=None, af_packet=None)
    try:
        path = os.path.join(read_only_probe, f".gpu-hardened-view-{os.getpid()}")
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        os.unlink(path)
    except OSError as error:
        view["create_under_probe"] = errno.errorcode.get(error.errno, error.errno)
    try:
        socket.socket(17, socket.SOCK_RAW).close()  # AF_PACKET
    except OSError as error:
        view["af_packet"] = errno.errorcode.get(error.errno, error.errno)
    return view


def double_in_place(tensor) -> None:
    """The IPC child: changes the parent's CUDA tensor through a shared handle."""
    import torch
    tensor.mul_(2)
    torch.cuda.synchronize()


def cuda_step(torch) -> str:
    if not torch.cuda.is_available():
        torch.cuda.init()  # raises with the reason
        raise RuntimeError("torch.cuda.is_available() is False")
    return (f"{torch.cuda.get_device_name(0)}, capability {torch.cuda.get_device_capability(0)}, "
            f"{torch.cuda.device_count()} device(s), torch {torch.__version__}, "
            f"CUDA {torch.version.cuda}")


def matmul_step(torch) -> str:
    generator = torch.Generator(device="cuda").manual_seed(0)
    a, b = (torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16, generator=generator)
            for _ in range(2))
    product = a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        a @ b
    end.record()
    torch.cuda.synchronize()
    tflops = 20 * 2 * 4096**3 / (start.elapsed_time(end) / 1e3) / 1e12
    reference = a.float().cpu() @ b.float().cpu()
    error = ((product.float().cpu() - reference).norm() / reference.norm()).item()
    if not error < 1e-2:
        raise AssertionError(f"relative error {error:.2e} against fp32 on the CPU (limit 1e-2)")
    return (f"4096^3 bf16: relative error {error:.2e} against fp32 on the CPU (limit 1e-2), "
            f"{tflops:.0f} TFLOP/s")


def compile_step(torch) -> str:
    def fused(x):
        return torch.sin(x) * torch.cos(x) + x.pow(2).mean()

    x = torch.randn(1 << 20, device="cuda")
    compiled = torch.compile(fused)(x)
    if not torch.allclose(compiled, fused(x), atol=1e-5, rtol=1e-5):
        raise AssertionError("torch.compile's result differs from eager")
    roots = {os.environ.get("TORCHINDUCTOR_CACHE_DIR", "/tmp"), os.path.expanduser("~")}
    cubins = [path for root in roots for path in Path(root).rglob("*.cubin")]
    if not cubins:
        raise AssertionError(f"no Triton .cubin written under {sorted(roots)}")
    return (f"torch.compile (inductor, Triton) matches eager; {len(cubins)} .cubin under "
            f"{sorted(roots)}")


def ipc_step(torch) -> str:
    context = torch.multiprocessing.get_context("spawn")
    shared = torch.arange(1 << 20, device="cuda", dtype=torch.float32)
    expected = shared * 2
    process = context.Process(target=double_in_place, args=(shared,))
    process.start()
    process.join(300)
    if process.exitcode != 0:
        raise AssertionError(f"the child exited with {process.exitcode}")
    torch.cuda.synchronize()
    if not torch.equal(shared, expected):
        raise AssertionError("the child's change did not reach the parent's tensor")
    allocator = os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "default allocator settings")
    return f"a spawned child doubled a shared 4 MiB CUDA tensor in place ({allocator})"


def cuda_workload() -> int:
    """What vLLM needs of the GPU, one line per step: the device, a bf16 matmul checked
    against fp32, torch.compile (Triton writes and runs code), CUDA IPC between processes.
    Returns 0 when every step passed."""
    import torch
    print(f"workload: view: {json.dumps(sandbox_view())}", flush=True)
    failed = 0
    for name, step in (("cuda", cuda_step), ("matmul", matmul_step),
                       ("compile", compile_step), ("ipc", ipc_step)):
        try:
            print(f"workload: {name}: ok: {step(torch)}", flush=True)
        except Exception as error:  # every failure is a result to report
            failed += 1
            print(f"workload: {name}: FAIL: {type(error).__name__}: {error}", flush=True)
            if name == "cuda":
                break
    print(f"workload: {'FAIL' if failed else 'ok'}: {failed} step(s) failed", flush=True)
    return 1 if failed else 0


# --- regenerating the groups ----------------------------------------------------------------

def groups_from_systemd(wanted: tuple[str, ...] = SERVICE_SYSCALL_FILTER) -> dict:
    """Each group `systemd-analyze syscall-filter` lists, nested groups followed."""
    found: dict[str, tuple[str, ...]] = {}
    pending = list(wanted)
    while pending:
        group = pending.pop()
        if group in found:
            continue
        output = subprocess.run(["systemd-analyze", "syscall-filter", "--no-pager", group],
                                capture_output=True, text=True, check=True).stdout
        entries = [line.strip() for line in output.splitlines()[1:]
                   if line.strip() and not line.strip().startswith("#")]
        found[group] = tuple(sorted(entries))
        pending += [entry for entry in entries if entry.startswith("@")]
    return dict(sorted(found.items()))


def print_groups() -> int:
    version = subprocess.run(["systemd-analyze", "--version"], capture_output=True, text=True,
                             check=True).stdout.splitlines()[0]
    print(f"# {version}")
    print("SYSCALL_GROUPS = {")
    for group, entries in groups_from_systemd().items():
        print(f"    {group!r}: {entries!r},")
    print("}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", metavar="DIR")
    parser.add_argument("--hide-gpus", action="store_true")
    parser.add_argument("--keep-home", action="store_true")
    parser.add_argument("--tolerate-refusal", action="store_true")
    parser.add_argument("--cuda-workload", action="store_true")
    parser.add_argument("--print-groups", action="store_true")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    if args.cuda_workload:
        return cuda_workload()
    if args.print_groups:
        return print_groups()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command: ... -- CMD [ARG...]")
    if os.geteuid() != 0:
        parser.error("needs root: it mounts, drops capabilities and changes user")
    return run(Options(command, args.weights, args.hide_gpus, args.keep_home,
                       args.tolerate_refusal))


if __name__ == "__main__":
    sys.exit(main())
