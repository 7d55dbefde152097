"""Disposable sandbox hosts: real systemd + sshd in systemd-nspawn containers on this machine.

    sandbox up [N] [--routers R]
                        boot N serving hosts (default 1) and R router hosts (default 0);
                        builds the rootfs tarball once
    sandbox status      list hosts, their PIDs and whether SSH answers
    sandbox reboot HOST [--power-cut]
                        power one host off (a clean shutdown, or killed outright) and boot
                        it again on the same disk
    sandbox ssh HOST [COMMAND...]
    sandbox down        stop every host; leaves no process, mount, veth or namespace

Options (before the verb): --name NAME (default "sbx", or $SANDBOX_NAME) keeps several
sandboxes apart (the tests use their own); --state-dir DIR (default .sandbox/).

Each host is an overlay of one cached Debian rootfs, booted with `systemd-nspawn -b
--network-veth`: its own network namespace, a private /24 on its veth pair, no gateway (so no
internet). The controller end of the veth carries 10.213.K.1, the host 10.213.K.2. Everything a
host installs arrives from the controller over SSH. Needs root, debootstrap and systemd-nspawn.
Hosts of one sandbox reach each other (a router its trays, a tray its peers): each has a route
to every peer's /24 through its controller address, and the controller forwards between those
veths only (per-interface forwarding; the machine's other interfaces forward nothing). An
`unreachable` route per sandbox /24 keeps a host's traffic off the machine's default route
while a peer's veth is down: it fails at once instead.
Router hosts (role "router", named NAMEr1, NAMEr2...) become inventories/sandbox.py's `router`
group; serving hosts (NAME1, NAME2...) its `sandbox` group.

Docker can run inside a host (for the `docker` runtime): the rootfs carries Debian's docker.io,
disabled until a deploy starts it, with legacy iptables; each host gets /var/lib/docker bound
from a plain folder STATE_DIR/NAME/HOST/docker (overlay2 cannot sit on the overlay root) and the
add_key/keyctl system calls (`docker run` joins a session keyring). A sandbox-only oneshot unit
remounts the cgroup v1 controllers read-write (nspawn mounts them read-only); no real host
needs or gets it.
State written for inventories/sandbox.py: STATE_DIR/NAME/hosts.json, id_ed25519, known_hosts,
api-key (the key the hosts' vLLM will require).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tools.repository import REPO

CACHE_DIR = Path(os.environ.get("SANDBOX_CACHE_DIR", REPO / ".cache"))
SUITE = "bookworm"
# What every sandbox host has before pyinfra touches it: what a freshly installed server has,
# plus libnuma1 and python3-venv, which real hosts need for vLLM too and which the deploy
# installs on hosts that lack them (the sandbox has no internet to fetch them), plus Debian's
# Docker (docker.io, with iptables), installed but disabled: the deploy's docker runtime
# enables and starts it on the hosts that use it, as it would install it on a real host.
ROOTFS_PACKAGES = [
    "systemd", "systemd-sysv", "dbus", "openssh-server", "iproute2", "iputils-ping",
    "python3", "python3-venv", "libnuma1", "curl", "ca-certificates", "sudo", "procps",
    "less", "kmod", "docker.io", "iptables",
]
ROOTFS_RECIPE_VERSION = 2  # bump when the recipe below changes, to rebuild the cached tarball
# Installed and started only on the sandbox's hosts, NEVER on a real host: systemd-nspawn
# mounts the cgroup v1 controller hierarchies read-only inside a host, and runc then fails with
# "mkdir /sys/fs/cgroup/cpuset/docker/...: read-only file system". A real host's cgroups are
# writable already. On a cgroup v2 machine there is nothing to remount and the unit does nothing.
SANDBOX_CGROUP_UNIT = "sandbox-cgroup-rw.service"
SANDBOX_CGROUP_UNIT_TEXT = """\
# SANDBOX ONLY (tools/sandbox): never install this on a real host.
# systemd-nspawn mounts the cgroup v1 controllers read-only inside a sandbox host; Docker
# (containerd/runc) must create its cgroups there, so remount them read-write first.
[Unit]
Description=Sandbox only: cgroup v1 controllers read-write for containers (nspawn mounts them read-only)
DefaultDependencies=no
After=local-fs.target
Before=containerd.service docker.service
ConditionPathIsMountPoint=/sys/fs/cgroup/cpuset

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/bin/sh -c 'for dir in /sys/fs/cgroup/*/; do if mountpoint -q "$dir"; then mount -o remount,rw,bind "$dir" || exit 1; fi; done'

[Install]
WantedBy=multi-user.target
"""
SUBNET_PREFIX = "10.213"
# A sandbox /24 whose veth is down (a test cuts a host off) must not fall through to the
# machine's default route: an `unreachable` route below the connected one rejects at once.
FALLBACK_METRIC = "4242"
SSH_TIMEOUT_S = 60
STOP_TIMEOUT_S = 30
# A clean shutdown stops the host's units as a real one does: vLLM drains first (its unit
# allows --shutdown-timeout plus 30 s).
REBOOT_STOP_TIMEOUT_S = 180


def log(message: str) -> None:
    print(f"sandbox: {message}", flush=True)


def fail(message: str) -> None:
    print(f"sandbox: error: {message}", file=sys.stderr, flush=True)
    sys.exit(1)


def run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=True, **kwargs)


# --- rootfs ---------------------------------------------------------------------------------

def debian_mirror() -> str:
    """The Debian mirror this machine's apt already uses (never hard-coded here)."""
    if os.environ.get("SANDBOX_DEBIAN_MIRROR"):
        return os.environ["SANDBOX_DEBIAN_MIRROR"]
    sources = sorted(Path("/etc/apt/sources.list.d").glob("*.sources"))
    for path in sources:
        uri = None
        for line in path.read_text().splitlines():
            if line.startswith("URIs:"):
                uri = line.split()[1]
            if line.startswith("Suites:") and SUITE in line.split()[1:] and uri:
                return uri
    legacy = Path("/etc/apt/sources.list")
    if legacy.exists():
        for line in legacy.read_text().splitlines():
            parts = line.split()
            if len(parts) >= 3 and parts[0] == "deb" and parts[2] == SUITE:
                return parts[1]
    fail(f"no apt source for Debian {SUITE} found; set SANDBOX_DEBIAN_MIRROR")
    raise AssertionError


def rootfs_id() -> str:
    recipe = json.dumps([SUITE, ROOTFS_PACKAGES, ROOTFS_RECIPE_VERSION]).encode()
    return f"{SUITE}-{hashlib.sha256(recipe).hexdigest()[:12]}"


def rootfs_tarball() -> Path:
    return CACHE_DIR / f"sandbox-rootfs-{rootfs_id()}.tar.zst"


def build_rootfs_tarball() -> Path:
    tarball = rootfs_tarball()
    if tarball.exists():
        return tarball
    for tool in ("debootstrap", "systemd-nspawn", "zstd", "ssh-keygen"):
        if not shutil.which(tool):
            fail(f"{tool} is not installed (apt-get install debootstrap systemd-container zstd "
                 "openssh-client)")
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(dir=CACHE_DIR, prefix="rootfs-build.") as build:
        root = Path(build) / "root"
        log(f"building Debian {SUITE} rootfs with debootstrap (once; cached as {tarball.name})")
        run(["debootstrap", "--variant=minbase", f"--include={','.join(ROOTFS_PACKAGES)}",
             SUITE, str(root), debian_mirror()], stdout=subprocess.DEVNULL)
        # Each host gets its own SSH host key and machine id when it is created.
        for key in (root / "etc/ssh").glob("ssh_host_*"):
            key.unlink()
        (root / "etc/machine-id").write_text("")
        run(["chroot", str(root), "systemctl", "enable", "systemd-networkd.service"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # Docker inside a host: legacy iptables (the setup checked with Docker 20.10 inside
        # nspawn), the daemons installed but off until a deploy starts them, and the
        # sandbox-only cgroup remount (see SANDBOX_CGROUP_UNIT).
        for name in ("iptables", "ip6tables"):
            run(["chroot", str(root), "update-alternatives", "--set", name,
                 f"/usr/sbin/{name}-legacy"], stdout=subprocess.DEVNULL)
        run(["chroot", str(root), "systemctl", "disable", "docker.service", "docker.socket",
             "containerd.service"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        (root / "etc/systemd/system" / SANDBOX_CGROUP_UNIT).write_text(SANDBOX_CGROUP_UNIT_TEXT)
        run(["chroot", str(root), "systemctl", "enable", SANDBOX_CGROUP_UNIT],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # Nothing on a sandbox host may reach out; keep boot quiet and fast.
        for unit in ("apt-daily.timer", "apt-daily-upgrade.timer", "e2scrub_all.timer",
                     "fstrim.timer", "systemd-timesyncd.service"):
            run(["chroot", str(root), "systemctl", "mask", unit],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        shutil.rmtree(root / "var/cache/apt/archives", ignore_errors=True)
        shutil.rmtree(root / "var/lib/apt/lists", ignore_errors=True)
        partial = tarball.with_suffix(".partial")
        with open(partial, "wb") as out:
            tar = subprocess.Popen(["tar", "-C", str(root), "--numeric-owner", "-cf", "-", "."],
                                   stdout=subprocess.PIPE)
            run(["zstd", "-q", "-T0", "-3"], stdin=tar.stdout, stdout=out)
            if tar.wait() != 0:
                fail("tar of the rootfs failed")
        partial.rename(tarball)
    log(f"rootfs tarball ready in {time.monotonic() - started:.0f}s: {tarball}")
    return tarball


def rootfs_lower() -> Path:
    """The unpacked rootfs shared read-only (as overlay lower dir) by every host."""
    lower = CACHE_DIR / f"sandbox-rootfs-{rootfs_id()}"
    if (lower / ".complete").exists():
        return lower
    tarball = build_rootfs_tarball()
    if lower.exists():
        shutil.rmtree(lower)
    lower.mkdir(parents=True)
    zstd = subprocess.Popen(["zstd", "-q", "-d", "-c", str(tarball)], stdout=subprocess.PIPE)
    run(["tar", "-C", str(lower), "--numeric-owner", "-xf", "-"], stdin=zstd.stdout)
    zstd.wait()
    (lower / ".complete").write_text("")
    return lower


# --- state ----------------------------------------------------------------------------------

class Sandbox:
    def __init__(self, state_root: Path, name: str):
        self.state_root = state_root
        self.name = name
        self.dir = state_root / name
        self.state_file = self.dir / "hosts.json"
        self.key = self.dir / "id_ed25519"
        self.known_hosts = self.dir / "known_hosts"
        self.api_key = self.dir / "api-key"

    def hosts(self) -> list[dict]:
        if not self.state_file.exists():
            return []
        return json.loads(self.state_file.read_text())["hosts"]

    def save(self, hosts: list[dict]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        data = {"name": self.name, "ssh_key": str(self.key), "api_key_file": str(self.api_key),
                "known_hosts": str(self.known_hosts), "hosts": hosts}
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        tmp.rename(self.state_file)

    def used_subnets(self) -> set[int]:
        """Subnets taken by any sandbox of this checkout, or by any interface on this machine
        (another checkout's sandbox included)."""
        used = set()
        for state in self.state_root.glob("*/hosts.json"):
            for host in json.loads(state.read_text())["hosts"]:
                used.add(host["subnet"])
        addresses = subprocess.run(["ip", "-o", "-4", "addr", "show"], capture_output=True,
                                   text=True, check=True).stdout
        prefix = f" {SUBNET_PREFIX}."
        for line in addresses.splitlines():
            if prefix in line:
                used.add(int(line.split(prefix, 1)[1].split(".")[0]))
        return used


# The nspawn processes this run of the tool started, by host name. Whether a child of ours still
# runs is asked of its Popen (waitpid), never of /proc: on a cold machine a child just spawned
# can show an empty /proc/PID/cmdline while its exec completes, and was taken for dead.
_children: dict[str, subprocess.Popen] = {}


def process_start_time(pid: int) -> int | None:
    """The kernel's start time of `pid` (/proc/PID/stat field 22, clock ticks since boot), or
    None when no such process runs (a zombie counts as ended). Fixed from fork, unlike cmdline."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name (field 2) is in parentheses and may hold spaces: split after it.
    fields = stat[stat.rindex(")") + 2:].split()
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def host_running(host: dict) -> bool:
    """Whether the host's nspawn still runs. A child of this process is asked through its
    Popen; a host booted by an earlier run is matched by PID and start time, so a recycled PID
    is not taken for it."""
    child = _children.get(host["name"])
    if child is not None:
        return child.poll() is None
    pid = host.get("pid")
    if not pid:
        return False
    started = process_start_time(pid)
    return started is not None and started == host.get("pid_start", started)


def why_not_running(host: dict) -> str:
    """What to tell about a host whose nspawn is gone: its exit status, when it was ours."""
    child = _children.get(host["name"])
    if child is not None and child.poll() is not None:
        return f"systemd-nspawn exited with status {child.returncode}"
    return "systemd-nspawn is not running"


def port_open(address: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((address, port), timeout=timeout):
            return True
    except OSError:
        return False


def veth_name(machine: str) -> str:
    return f"ve-{machine}"[:15]


# --- up -------------------------------------------------------------------------------------

def write_host_files(merged: Path, host: dict, controller_pubkey: str, host_key: Path,
                     peer_subnets: list[int]) -> None:
    (merged / "etc/hostname").write_text(host["name"] + "\n")
    (merged / "etc/hosts").write_text(f"127.0.0.1 localhost\n127.0.1.1 {host['name']}\n")
    (merged / "etc/machine-id").write_text(hashlib.md5(host["name"].encode()).hexdigest() + "\n")
    network = merged / "etc/systemd/network/10-host0.network"
    network.parent.mkdir(parents=True, exist_ok=True)
    # No Gateway=: a sandbox host must not reach the internet. A route to each peer only.
    routes = "".join(f"\n[Route]\nDestination={subnet_of({'subnet': subnet})}\n"
                     f"Gateway={host['controller_address']}\n" for subnet in peer_subnets)
    network.write_text(f"[Match]\nName=host0\n\n[Network]\nAddress={host['address']}/24\n"
                       "LinkLocalAddressing=no\nIPv6AcceptRA=no\n" + routes)
    ssh_dir = merged / "root/.ssh"
    ssh_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    (ssh_dir / "authorized_keys").write_text(controller_pubkey)
    os.chmod(ssh_dir / "authorized_keys", 0o600)
    for suffix in ("", ".pub"):
        dest = merged / "etc/ssh" / f"ssh_host_ed25519_key{suffix}"
        shutil.copyfile(f"{host_key}{suffix}", dest)
        os.chmod(dest, 0o600 if not suffix else 0o644)
    # Only the key we wrote; without this sshd logs errors for the missing RSA/ECDSA keys.
    (merged / "etc/ssh/sshd_config.d/10-sandbox.conf").write_text(
        "HostKey /etc/ssh/ssh_host_ed25519_key\nUseDNS no\n")


def boot_host(sandbox: Sandbox, host: dict, lower: Path, pubkey: str,
              peer_subnets: list[int]) -> None:
    host_dir = sandbox.dir / host["name"]
    for sub in ("upper", "work", "merged", "docker"):
        (host_dir / sub).mkdir(parents=True, exist_ok=True)
    merged = host_dir / "merged"
    run(["mount", "-t", "overlay", "overlay", "-o",
         f"lowerdir={lower},upperdir={host_dir / 'upper'},workdir={host_dir / 'work'}",
         str(merged)])
    host_key = host_dir / "ssh_host_ed25519_key"
    if not host_key.exists():
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", host["name"],
             "-f", str(host_key)])
    write_host_files(merged, host, pubkey, host_key, peer_subnets)
    host["merged"] = str(merged)
    host["known_key"] = Path(f"{host_key}.pub").read_text().split()[:2]
    start_host(sandbox, host)


def start_host(sandbox: Sandbox, host: dict) -> None:
    """Boot the host's systemd on its mounted overlay (a first boot, or a boot after a
    power-off: the overlay and what the host wrote stay)."""
    host_dir = sandbox.dir / host["name"]
    console_log = open(host_dir / "console.log", "ab")
    process = subprocess.Popen(
        ["systemd-nspawn", "-D", host["merged"], "-M", host["name"], "-b", "--network-veth",
         "--register=no", "--keep-unit", "--console=passive",
         # Docker inside a host: `docker run` joins a session keyring (else "unable to join
         # session keyring"), and /var/lib/docker must be a plain directory, not on the
         # overlay root (overlay2 on overlayfs fails). Removed with the host by `down`.
         "--system-call-filter=add_key keyctl",
         f"--bind={host_dir / 'docker'}:/var/lib/docker"],
        stdin=subprocess.DEVNULL, stdout=console_log, stderr=subprocess.STDOUT,
        start_new_session=True)
    _children[host["name"]] = process
    host["pid"] = process.pid
    host["pid_start"] = process_start_time(process.pid)


def wait_until(host: dict, ready, before: str, late: str, deadline: float,
               step: float) -> None:
    """Poll ready() every `step` seconds; fail naming the host and its console log when its
    nspawn child exits first ("... before `before`") or the deadline passes (`late`)."""
    while not ready():
        console = Path(host["merged"]).parent / "console.log"
        if not host_running(host):
            fail(f"{host['name']}: {why_not_running(host)} before {before}; see {console}")
        if time.monotonic() > deadline:
            fail(f"{host['name']}: {late}; see {console}")
        time.sleep(step)


def configure_controller_end(host: dict, deadline: float) -> None:
    iface = veth_name(host["name"])
    wait_until(host, Path(f"/sys/class/net/{iface}").exists, f"veth {iface} appeared",
               f"veth {iface} never appeared", deadline, 0.1)
    run(["ip", "addr", "replace", f"{host['controller_address']}/24", "dev", iface])
    run(["ip", "link", "set", iface, "up"])
    # Packets that come in on this veth may go out on another sandbox veth (a host's only
    # routes lead there); the machine-wide ip_forward stays as it is.
    Path(f"/proc/sys/net/ipv4/conf/{iface}/forwarding").write_text("1\n")
    run(["ip", "route", "replace", "unreachable", subnet_of(host), "metric", FALLBACK_METRIC])


def subnet_of(host: dict) -> str:
    """The /24 of a host (a planned host, or {"subnet": K}): 10.213.K.0/24."""
    return f"{SUBNET_PREFIX}.{host['subnet']}.0/24"


def plan_hosts(name: str, count: int, routers: int, subnets: list[int], cpus: int) -> list[dict]:
    """The hosts to boot: `count` serving hosts NAME1.., then `routers` router hosts NAMEr1..,
    one free subnet each."""
    roles = [("serve", f"{name}{index}") for index in range(1, count + 1)]
    roles += [("router", f"{name}r{index}") for index in range(1, routers + 1)]
    return [{
        "name": host_name,
        "role": role,
        "subnet": subnet,
        "address": f"{SUBNET_PREFIX}.{subnet}.2",
        "controller_address": f"{SUBNET_PREFIX}.{subnet}.1",
        # vLLM pins its OpenMP threads; hosts sharing this machine must not share a CPU.
        "cpu": position % cpus,
        "pid": None,
    } for position, ((role, host_name), subnet) in enumerate(zip(roles, subnets))]


def cmd_up(sandbox: Sandbox, count: int, routers: int = 0) -> None:
    if os.geteuid() != 0:
        fail("needs root (systemd-nspawn, mount, ip)")
    existing = sandbox.hosts()
    if existing and not any(host_running(host) for host in existing):
        log(f"sandbox '{sandbox.name}' left state behind but no host runs (a reboot?): cleaning up")
        cmd_down(sandbox, quiet=True)
        existing = []
    if existing:
        fail(f"sandbox '{sandbox.name}' is already up with {len(existing)} host(s); "
             f"run 'sandbox --name {sandbox.name} down' first")
    started = time.monotonic()
    lower = rootfs_lower()
    sandbox.dir.mkdir(parents=True, exist_ok=True)
    if not sandbox.key.exists():
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"sandbox-{sandbox.name}",
             "-f", str(sandbox.key)])
    pubkey = Path(f"{sandbox.key}.pub").read_text()
    if not sandbox.api_key.exists():
        # The key clients of the sandbox's vLLM must send (group data: vllm_api_key_file).
        sandbox.api_key.touch(mode=0o600)
        sandbox.api_key.write_text(secrets.token_urlsafe(32) + "\n")
    used = sandbox.used_subnets()
    free = [n for n in range(1, 250) if n not in used][:count + routers]
    if len(free) < count + routers:
        fail("no free sandbox subnets left")
    hosts = plan_hosts(sandbox.name, count, routers, free, os.cpu_count() or 1)
    for host in hosts:
        if Path(f"/sys/class/net/{veth_name(host['name'])}").exists():
            fail(f"a sandbox host named {host['name']} already runs on this machine (another "
                 f"checkout?); pick another --name")
    try:
        for host in hosts:
            boot_host(sandbox, host, lower, pubkey,
                      [peer["subnet"] for peer in hosts if peer is not host])
            sandbox.save(hosts)  # saved as soon as a PID exists, so `down` can always clean up
        deadline = time.monotonic() + SSH_TIMEOUT_S
        for host in hosts:
            configure_controller_end(host, deadline)
        sandbox.known_hosts.write_text("".join(
            f"{host['address']} {' '.join(host['known_key'])}\n" for host in hosts))
        for host in hosts:
            wait_until(host, lambda: port_open(host["address"], 22), "sshd answered",
                       f"sshd did not answer on {host['address']}:22 within {SSH_TIMEOUT_S}s",
                       deadline, 0.2)
            # What sshd prints while the host still boots (pam_nologin's "System is booting
            # up", shown to root too) is kept back unless the login fails.
            login = subprocess.run(ssh_command(sandbox, host) + ["true"], capture_output=True,
                                   text=True)
            if login.returncode != 0:
                fail(f"{host['name']}: ssh root@{host['address']} true exited "
                     f"{login.returncode}: {login.stderr.strip() or '(nothing on stderr)'}")
    except BaseException:
        for host in hosts:
            console = sandbox.dir / host["name"] / "console.log"
            if console.exists():
                tail = console.read_text(errors="replace").splitlines()[-15:]
                log(f"{host['name']} console, last lines:\n    " + "\n    ".join(tail))
        log("start-up failed; tearing down what was started")
        cmd_down(sandbox, quiet=True)
        raise
    for host in hosts:
        log(f"{host['name']} up at {host['address']} (nspawn pid {host['pid']})")
    log(f"{len(hosts)} host(s) up in {time.monotonic() - started:.1f}s; "
        f"inventory: SANDBOX_NAME={sandbox.name} inventories/sandbox.py")


# --- down / status / ssh ----------------------------------------------------------------------

def ssh_command(sandbox: Sandbox, host: dict) -> list[str]:
    return ["ssh", "-i", str(sandbox.key), "-o", f"UserKnownHostsFile={sandbox.known_hosts}",
            "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes", "-o", "ConnectTimeout=5",
            f"root@{host['address']}"]


def ssh(sandbox: Sandbox, host: dict, command: list[str]):
    return subprocess.run(ssh_command(sandbox, host) + command)


def kill_init(nspawn_pid: int) -> None:
    """SIGKILL the host's init, nspawn's child: killing PID 1 of its namespace kills every
    process in it at once."""
    try:
        children = Path(f"/proc/{nspawn_pid}/task/{nspawn_pid}/children").read_text().split()
    except OSError:
        return  # nspawn is gone already
    for child in children:
        try:
            os.kill(int(child), signal.SIGKILL)
        except ProcessLookupError:
            pass


def cmd_down(sandbox: Sandbox, quiet: bool = False) -> None:
    hosts = sandbox.hosts()
    if not hosts:
        if not quiet:
            log(f"sandbox '{sandbox.name}' is not up")
        return
    for host in hosts:
        if host_running(host):
            os.kill(host["pid"], signal.SIGTERM)  # nspawn asks the host's systemd to power off
    deadline = time.monotonic() + STOP_TIMEOUT_S
    for host in hosts:
        while host_running(host) and time.monotonic() < deadline:
            time.sleep(0.2)
        if host_running(host):
            log(f"{host['name']}: did not power off in {STOP_TIMEOUT_S}s; killing its init and "
                f"pid {host['pid']}")
            kill_init(host["pid"])  # nspawn killed alone would leave the host's processes
            os.kill(host["pid"], signal.SIGKILL)
            while host_running(host):
                time.sleep(0.1)
    for host in hosts:
        host_dir = sandbox.dir / host["name"]
        merged = host_dir / "merged"
        if os.path.ismount(merged):
            run(["umount", str(merged)])
        iface = veth_name(host["name"])
        if Path(f"/sys/class/net/{iface}").exists():
            subprocess.run(["ip", "link", "delete", iface], check=False)
        subprocess.run(["ip", "route", "del", "unreachable", subnet_of(host), "metric",
                        FALLBACK_METRIC], check=False, capture_output=True)
        shutil.rmtree(host_dir, ignore_errors=True)
        if not quiet:
            log(f"{host['name']} down")
    sandbox.state_file.unlink()
    sandbox.known_hosts.unlink(missing_ok=True)


def cmd_reboot(sandbox: Sandbox, name: str, power_cut: bool) -> None:
    """Power one host off and boot it again on the same disk: a clean shutdown (its systemd
    stops every unit, vLLM's drain included), or with power_cut its init killed outright
    (nothing stopped, nothing flushed by the host). Returns once SSH answers again."""
    hosts = sandbox.hosts()
    match = [host for host in hosts if host["name"] == name]
    if not match:
        fail(f"no host {name} in sandbox '{sandbox.name}'")
    host = match[0]
    started = time.monotonic()
    if host_running(host) and power_cut:
        # The host's init, nspawn's child: killing PID 1 of its namespace kills every process
        # in it at once (killing nspawn alone would leave them running).
        kill_init(host["pid"])
    elif host_running(host):
        os.kill(host["pid"], signal.SIGTERM)  # nspawn asks the host's systemd to power off
    if host_running(host):
        deadline = time.monotonic() + REBOOT_STOP_TIMEOUT_S
        while host_running(host) and time.monotonic() < deadline:
            time.sleep(0.2)
        if host_running(host):
            fail(f"{name}: did not power off in {REBOOT_STOP_TIMEOUT_S}s (pid {host['pid']})")
    log(f"{name} powered off ({'power cut' if power_cut else 'shutdown'}) "
        f"in {time.monotonic() - started:.1f}s")
    start_host(sandbox, host)
    sandbox.save(hosts)  # the new PID, so `down` finds it
    deadline = time.monotonic() + SSH_TIMEOUT_S
    configure_controller_end(host, deadline)
    wait_until(host, lambda: port_open(host["address"], 22), "sshd answered",
               f"sshd did not answer on {host['address']}:22 within {SSH_TIMEOUT_S}s",
               deadline, 0.2)
    log(f"{name} up again at {host['address']} (nspawn pid {host['pid']}) "
        f"{time.monotonic() - started:.1f}s after the power-off began")


def cmd_status(sandbox: Sandbox) -> int:
    hosts = sandbox.hosts()
    if not hosts:
        log(f"sandbox '{sandbox.name}' is not up")
        return 1
    healthy = True
    for host in hosts:
        alive = host_running(host)
        reachable = alive and port_open(host["address"], 22)
        healthy = healthy and reachable
        state = "up" if reachable else ("booting/unreachable" if alive else "dead")
        print(f"{host['name']:8} {host['address']:15} pid {host['pid']!s:8} {state}")
    return 0 if healthy else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", default=os.environ.get("SANDBOX_NAME", "sbx"))
    parser.add_argument("--state-dir", default=os.environ.get("SANDBOX_STATE_DIR",
                                                             str(REPO / ".sandbox")))
    sub = parser.add_subparsers(dest="verb", required=True)
    up = sub.add_parser("up")
    up.add_argument("count", nargs="?", type=int, default=1)
    up.add_argument("--routers", type=int, default=0,
                    help="router hosts to boot besides (the `router` group)")
    sub.add_parser("down")
    sub.add_parser("status")
    sub.add_parser("rootfs", help="only build the cached rootfs tarball")
    reboot = sub.add_parser("reboot", help="power one host off and boot it again")
    reboot.add_argument("host")
    reboot.add_argument("--power-cut", action="store_true",
                        help="kill it outright instead of a clean shutdown")
    ssh_parser = sub.add_parser("ssh")
    ssh_parser.add_argument("host")
    ssh_parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    if not args.name.isalnum() or len(args.name) > 8:
        fail("--name must be alphanumeric and at most 8 characters (it names veth interfaces)")
    sandbox = Sandbox(Path(args.state_dir), args.name)
    if args.verb == "up":
        if not 1 <= args.count <= 16 or not 0 <= args.routers <= 2:
            fail("host count must be between 1 and 16, routers between 0 and 2")
        cmd_up(sandbox, args.count, args.routers)
    elif args.verb == "down":
        cmd_down(sandbox)
    elif args.verb == "status":
        return cmd_status(sandbox)
    elif args.verb == "reboot":
        cmd_reboot(sandbox, args.host, args.power_cut)
    elif args.verb == "rootfs":
        print(build_rootfs_tarball())
    elif args.verb == "ssh":
        match = [h for h in sandbox.hosts() if h["name"] == args.host]
        if not match:
            fail(f"no host {args.host} in sandbox '{sandbox.name}'")
        return ssh(sandbox, match[0], args.command).returncode
    return 0


if __name__ == "__main__":
    sys.exit(main())
