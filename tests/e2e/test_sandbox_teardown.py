"""Last e2e module: `sandbox down` leaves no process, mount, veth or state behind."""

import subprocess
from pathlib import Path

from tests.e2e.common import SANDBOX, sandbox_tool
from tests.helpers import REPO


def test_down_leaves_no_process_mount_or_veth_behind(sandbox):
    booted = sandbox["hosts"] + sandbox["routers"]
    pids = [h["pid"] for h in booted]
    down = sandbox_tool("down")
    assert down.returncode == 0, down.stdout + down.stderr
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or b"nspawn" not in \
            Path(f"/proc/{pid}/cmdline").read_bytes()
    mounts = Path("/proc/mounts").read_text()
    assert f".sandbox/{SANDBOX}/" not in mounts
    routes = subprocess.run(["ip", "route", "show"], capture_output=True, text=True).stdout
    for host in booted:
        assert f"{host['address'].rsplit('.', 1)[0]}.0/24" not in routes
        assert not Path(f"/sys/class/net/ve-{host['name']}").exists()
    assert not (REPO / ".sandbox" / SANDBOX / "hosts.json").exists()
