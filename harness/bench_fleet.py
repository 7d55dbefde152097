"""Fleet benchmarks on sandbox hosts with serving off, printed as markdown tables for the README.

    python -m harness.bench_fleet loop [HOSTS ...]            (default: 1 4 8)
    python -m harness.bench_fleet fetch-once [HOSTS [SHARDS [SHARD_MIB]]]   (default: 4 4 256)

Needs root and `make venv artefacts`. Each host count gets its own sandbox ("fbench"), torn
down afterwards. Serving is off: the deploy is preflight, system and weights from a Hub mirror
(tests/e2e/hub_inventory.py and hub_deploy.py, as the Hub e2e runs them), because eight CPU
vLLMs do not fit this machine's two cores; what it measures is the deploy loop itself. The
"Hub" is hub-mirror: for loop one for the fleet, as a site has one Hub (the sandbox routes every
host to the first host's controller address); for fetch-once one on each host's controller
address, whose byte counters add up to the egress.

loop: the first deploy, the no-op re-run (median of 5) and the controller's CPU time in it
(pyinfra's user + system time). In a fleet of more than one host, the no-op runs alternate with
runs limited to its first host (``--limit``), and the ratio is the fleet's median over that
one host's: both measured in the same minute, so that the machine's drift between fleets
(one host's no-op swung 0.69-0.94 s from one fleet to the next) does not make the ratio. Last,
each count against the one-host fleet's: the controller's CPU per extra host.

fetch-once: the tiny model plus SHARDS random shards of SHARD_MIB MiB, into a new folder on
every host, first every host from the Hub, then with weights_peer_copy: Hub egress and wall
time of each.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from harness import hub_mirror
from tools.repository import REPO

SANDBOX = "fbench"
VENV_BIN = Path(sys.executable).parent
ENV = {**os.environ, "SANDBOX_NAME": SANDBOX, "PYTHONUNBUFFERED": "1",
       "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '')}"}
SANDBOX_TOOL = [sys.executable, "-m", "harness.sandbox", "--name", SANDBOX]


class Fleet:
    """A sandbox of ``hosts`` hosts, each with hub-mirror serving ``repo`` on its controller
    address, or with ``one_hub`` one hub-mirror for all, on the first host's controller
    address (the sandbox routes every host to it); torn down on exit."""

    def __init__(self, hosts: int, repo: Path, workdir: Path, one_hub: bool = False):
        self.hosts, self.repo, self.workdir, self.one_hub = hosts, repo, workdir, one_hub
        self.mirrors: list[subprocess.Popen] = []
        self.urls: dict[str, str] = {}

    def __enter__(self) -> "Fleet":
        subprocess.run([*SANDBOX_TOOL, "down"], cwd=REPO, env=ENV, capture_output=True)
        try:
            subprocess.run([*SANDBOX_TOOL, "up", str(self.hosts)], cwd=REPO, env=ENV,
                           check=True, stdout=subprocess.DEVNULL)
            state = json.loads((REPO / ".sandbox" / SANDBOX / "hosts.json").read_text())
            for host in state["hosts"]:
                if not (self.one_hub and self.urls):
                    url = self.start_mirror(host["controller_address"])
                self.urls[host["name"]] = url
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *_) -> None:
        for process in self.mirrors:
            hub_mirror.stop(process)
        subprocess.run([*SANDBOX_TOOL, "down"], cwd=REPO, env=ENV, capture_output=True)

    def start_mirror(self, address: str) -> str:
        process, url = hub_mirror.launch(
            self.workdir, {"sandbox/tiny-kimi": self.repo}, listen=f"{address}:0",
            hash_cache=self.workdir / "hash-cache.json", who="bench-fleet", start_timeout_s=120)
        self.mirrors.append(process)
        return url

    def deploy(self, data: dict, limit: str | None = None) -> tuple[float, float]:
        """(wall seconds, the controller's CPU seconds) of one deploy, of ``limit``'s host
        alone if given."""
        ports = {name: int(url.rsplit(":", 1)[1]) for name, url in self.urls.items()}
        if self.one_hub:
            data = {**data, "weights_hf_endpoint": next(iter(self.urls.values()))}
        env = {**ENV, "HUB_E2E_PORTS": json.dumps(ports), "HUB_E2E_DATA": json.dumps(data)}
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.monotonic()
        result = subprocess.run([str(VENV_BIN / "pyinfra"), "-y",
                                 *(["--limit", limit] if limit else []),
                                 "tests/e2e/hub_inventory.py", "tests/e2e/hub_deploy.py"],
                                cwd=REPO, env=env, capture_output=True, text=True)
        wall = time.monotonic() - started
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if result.returncode != 0:
            raise SystemExit(f"bench-fleet: the deploy failed:\n{result.stdout[-3000:]}"
                             f"{result.stderr[-2000:]}")
        return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)

    def egress(self) -> int:
        """Bytes every mirror sent since the last reset, and reset them."""
        sent = 0
        for url in set(self.urls.values()):
            sent += sum(call(url, "GET", "/_mirror/stats")["bytes_sent"].values())
            call(url, "POST", "/_mirror/stats/reset")
        return sent


def call(url: str, method: str, path: str):
    with urllib.request.urlopen(urllib.request.Request(url + path, method=method),
                                timeout=10) as response:
        return json.load(response)


def loop(counts: list[int], workdir: Path) -> list[str]:
    data = {"weights_dir": "/raid/bench", "weights_verify_schedule": None}
    rows = ["| hosts | first deploy | no-op re-run (median of 5) | its first host alone, "
            "alternated (median of 5) | ratio | controller CPU, no-op (median) |",
            "|---|---|---|---|---|---|"]
    cpus: dict[int, float] = {}  # hosts -> the controller's CPU in the no-op (median)
    for count in counts:
        # One Hub endpoint for the fleet, as on a site: the controller lists the repo once per
        # run, not once per host as it would for a mirror on each host's own address.
        with Fleet(count, REPO / ".cache" / "tiny-model", workdir, one_hub=True) as fleet:
            first, _ = fleet.deploy(data)
            runs, alone = [], []
            for _ in range(5):
                runs.append(fleet.deploy(data))
                if count > 1:
                    alone.append(fleet.deploy(data, limit=next(iter(fleet.urls)))[0])
        walls = [wall for wall, _ in runs]
        wall, cpus[count] = statistics.median(walls), statistics.median(cpu for _, cpu in runs)
        one = f"{statistics.median(alone):.2f} s (runs: {_figures(alone)})" if alone else "-"
        ratio = f"{wall / statistics.median(alone):.2f}x" if alone else "-"
        rows.append(f"| {count} | {first:.1f} s | {wall:.2f} s (runs: {_figures(walls)}) | "
                    f"{one} | {ratio} | {cpus[count]:.2f} s |")
    if 1 in cpus:
        rows.append("")
        rows += [f"{count} hosts: controller CPU {(cpus[count] - cpus[1]) / (count - 1) * 1000:.0f}"
                 " ms more per extra host than the one-host fleet's" for count in cpus if count > 1]
    return rows


def _figures(seconds: list[float]) -> str:
    return " ".join(f"{value:.2f}" for value in seconds)


def fetch_once(hosts: int, shards: int, mib: int, workdir: Path) -> list[str]:
    repo = workdir / "repo"
    shutil.copytree(REPO / ".cache" / "tiny-model", repo)
    for index in range(1, shards + 1):
        with open(repo / f"extra-{index:05d}-of-{shards:05d}.safetensors", "wb") as out:
            for _ in range(mib):
                out.write(os.urandom(1024 * 1024))
    size = sum(path.stat().st_size for path in repo.iterdir())
    rows = [f"Repository: {size / 1e9:.2f} GB ({shards} shards of {mib} MiB + the tiny model).",
            "", "| hosts | weights | Hub egress | deploy (preflight, system, weights) |",
            "|---|---|---|---|"]
    with Fleet(hosts, repo, workdir) as fleet:
        # The hf CLI and the fetch script first, so that both ways time the weights alone.
        fleet.deploy({"weights_dir": "/raid/bench-warm", "weights_include": ["config.json"],
                      "weights_verify_schedule": None})
        fleet.egress()
        for label, folder, extra in (
                ("every host from the Hub", "/raid/bench-hub", {}),
                ("fetched once, copied host to host", "/raid/bench-peers",
                 {"weights_peer_copy": True})):
            wall, _ = fleet.deploy({"weights_dir": folder, "weights_verify_schedule": None,
                                    **extra})
            sent = fleet.egress()
            rows.append(f"| {hosts} | {label} | {sent / 1e9:.2f} GB ({sent / size:.1f}x) | "
                        f"{wall:.1f} s |")
    return rows


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("loop", "fetch-once"):
        print(__doc__, file=sys.stderr)
        return 2
    numbers = [int(value) for value in argv[1:]]
    workdir = Path(tempfile.mkdtemp(prefix="bench-fleet-"))
    try:
        if argv[0] == "loop":
            rows = loop(numbers or [1, 4, 8], workdir)
        else:
            hosts, shards, mib = (numbers + [4, 4, 256][len(numbers):])[:3]
            rows = fetch_once(hosts, shards, mib, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
