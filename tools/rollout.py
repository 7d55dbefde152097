"""Roll a change out to the trays batch by batch, each one out of the routers while it restarts.

    rollout INVENTORY [--batch N] [--data KEY=VALUE ...] [--exclude HOST ...] [--out DIR]
                      [--plan]

pyinfra has no `serial:` batches, so this drives it:
  1. the plan: `pyinfra INVENTORY deploy.py --dry --json` (with the same --data); the trays
     whose plan restarts vLLM (tasks.vllm_service.RESTART_OPERATION) are rolled, in inventory
     order: first a canary of one, then batches of --batch (default: the data key
     vllm_rollout_batch);
  2. per batch: each router in front of a tray of the batch stops sending it requests
     (POST /remove_worker), `pyinfra -y --limit TRAY... INVENTORY deploy.py` converges the batch
     (vLLM drains in-flight requests within vllm_shutdown_timeout_s, restarts, and the deploy
     waits for /health), then each router takes it back (POST /add_worker) and the roll-out
     waits until every router's /health reports all its trays healthy;
  3. hosts whose plan changes without restarting vLLM (a router, a mode fix) are deployed last,
     together.
--plan prints the batches and changes nothing. A host that does not answer stops the roll-out
before it starts (exit 2, naming it): rolling the others would take more trays out of service
while one is missing already; `--exclude HOST` says to roll them anyway.

A batch whose deploy fails stops the roll-out: the deploy has put that tray's last good
release back and restarted it (tasks/vllm_service.py); the tray goes back behind the routers
if it serves, and the trays not reached keep the old release. Exit status: 0 rolled (or
nothing to roll), 1 stopped at a batch (each host and cause named), 2 nothing rolled (the plan
failed: bad data, an unreachable host). Each pyinfra run's output is kept under --out
(default results/rollout/<time>/, the owner only).

The routers' admin routes take no key and listen where the router does (loopback by default):
the calls run on the router host, over the inventory's own connection (`pyinfra ... exec`).
Interrupted (Ctrl-C, SIGTERM) while a batch is out of the routers, it waits for any restart
the batch's deploy had begun to end (systemd finishes it without pyinfra), puts back each of
the batch's trays that answers /health within SETTLE_TIMEOUT_S (15 min), names those it
leaves out, and exits 130 (Ctrl-C again leaves them out at once); run it again to roll what
is still to change. Killed outright (SIGKILL), it leaves the batch out of the
routers until the next roll-out's batch or a restart of vllm-router.service (its unit lists
them all).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from tasks import data_keys
from tasks.vllm_router import BACKENDS_CA
from tasks.vllm_router import GROUP as ROUTER_GROUP
from tasks.vllm_router import backend_url, backends_of, settings_from
from tasks.vllm_service import RESTART_OPERATION, UNIT_NAME
from tools.drift_check import UNREACHABLE, inventory_hosts
from tools.repository import REPO, missing_packages, venv_command

ROLLED, STOPPED, NOT_STARTED = 0, 1, 2
INTERRUPTED = 130  # as a shell reports a command Ctrl-C stopped
# What pyinfra prints when SIGINT stops it (and then it exits 0).
PYINFRA_INTERRUPTED = "Exiting upon user request!"
# After an interrupted batch, how long each of its trays gets to end a restart its deploy had
# begun (systemd's stop timeout bounds that first), then again to answer /health before it is
# left out of the routers: a GB200 tray loads Kimi-K2.6 in ~12 min. Ctrl-C again: at once.
SETTLE_TIMEOUT_S = 900


@dataclass
class Router:
    name: str
    local_url: str  # the router's base URL on its own host
    backends: tuple[str, ...]  # its trays' URLs
    health_timeout_s: int


def batches_of(trays: list[str], size: int) -> list[list[str]]:
    """A canary of one, then batches of `size`."""
    if not trays:
        return []
    rest = trays[1:]
    return [trays[:1]] + [rest[start:start + size] for start in range(0, len(rest), size)]


def restarting(report: dict, order: list[str]) -> tuple[list[str], list[str]]:
    """From a dry run's JSON report: the trays whose plan restarts vLLM, and the hosts with
    other planned changes only, each in `order` (the inventory's)."""
    changed, restarted = set(), set()
    for operation in report.get("plan", []):
        hosts = set(operation.get("hosts_with_change") or [])
        changed |= hosts
        if operation["name"] == RESTART_OPERATION:
            restarted |= hosts
    return ([name for name in order if name in restarted],
            [name for name in order if name in changed and name not in restarted])


def own_data(data: dict) -> dict:
    """A host's data as tools.inventory prints it, less the groups it adds."""
    return {key: value for key, value in data.items() if key != "_groups"}


def routers_of(hosts: dict[str, dict]) -> list[Router]:
    """The inventory's routers (hosts: name -> data with `_groups`, as tools.inventory prints)."""
    clean = {name: own_data(data) for name, data in hosts.items()}
    members = [(name, set(data["_groups"]), clean[name]) for name, data in hosts.items()]
    routers = []
    for name, data in hosts.items():
        if ROUTER_GROUP not in data["_groups"]:
            continue
        backends = backends_of(clean[name].get("router_backend_group"), members)
        settings = settings_from(name, clean[name], backends)
        routers.append(Router(name, settings.local_url, settings.backends,
                              settings.health_timeout_s))
    return routers


def batch_size(hosts: dict[str, dict], trays: list[str], given: int | None) -> int:
    """--batch, else the first rolled tray's vllm_rollout_batch."""
    if given is not None:
        return given
    if not trays:
        return 1
    return data_keys.read(trays[0], own_data(hosts[trays[0]]))["vllm_rollout_batch"]


def remove_script(router: Router, urls: list[str]) -> str:
    """Shell on the router host: stop sending requests to `urls` (one absent already is fine:
    a roll-out interrupted before)."""
    base = router.local_url
    calls = [f"curl -sS -o /dev/null -X POST {shlex.quote(f'{base}/remove_worker?url={url}')}"
             for url in urls]
    return " && ".join(calls)


def add_script(router: Router, urls: list[str]) -> str:
    """Shell on the router host: take `urls` back, then wait until /workers lists each and
    /health says every worker is healthy (exit 1 after the router's health timeout)."""
    base = router.local_url
    adds = "; ".join(f"curl -sS -o /dev/null -X POST {shlex.quote(f'{base}/add_worker?url={url}')}"
                     for url in urls)
    listed = " && ".join(f'grep -qF {shlex.quote(json.dumps(url))} "$workers"' for url in urls)
    return (f"{adds}; workers=$(mktemp); deadline=$(( $(date +%s) + {router.health_timeout_s} )); "
            f"until curl -fsS {shlex.quote(base + '/workers')} > \"$workers\" "
            f"&& {listed} && curl -fs -o /dev/null {shlex.quote(base + '/health')}; do "
            f"if [ $(date +%s) -ge $deadline ]; then echo 'not every worker healthy within "
            f"{router.health_timeout_s}s:' >&2; cat \"$workers\" >&2; rm -f \"$workers\"; "
            f"exit 1; fi; sleep 1; done; rm -f \"$workers\"")


def settled_script(timeout_s: int = SETTLE_TIMEOUT_S) -> str:
    """Shell on a tray after an interrupted batch: wait (at most `timeout_s`) until systemd
    runs no job of vllm.service. A restart the killed deploy had asked for goes on without it,
    and until its stop ends the old server still answers /health: put back then, the tray
    would fail the requests the router sends it in the meantime."""
    return (f"deadline=$(( $(date +%s) + {timeout_s} )); "
            f"while [ -n \"$(systemctl list-jobs --no-legend {UNIT_NAME})\" ] "
            f"&& [ $(date +%s) -lt $deadline ]; do sleep 1; done")


def put_back_script(router: Router, urls: list[str], wait_s: int = SETTLE_TIMEOUT_S,
                    ca_file: str = BACKENDS_CA) -> str:
    """Shell on the router host after an interrupted batch (each tray settled first:
    settled_script): take back each of `urls` that answers /health within `wait_s` (a
    restart the deploy began loads its model meanwhile; left out, a tray whose new release
    needs no restart any more would stay out of the router past the next roll-out), and say
    which were put back and which left out. An https tray is asked trusting `ca_file`, what
    the router trusts its trays by (tasks/vllm_router.py places it with any https backend)."""
    base = router.local_url

    def health(url: str) -> str:
        trust = ["--cacert", ca_file] if url.startswith("https://") else []
        return shlex.join(["curl", "-fs", "-o", "/dev/null", "--max-time", "5", *trust,
                           url + "/health"])

    return f"deadline=$(( $(date +%s) + {wait_s} )); " + "; ".join(
        f"until {health(url)} || [ $(date +%s) -ge $deadline ]; do sleep 1; done; "
        f"if {health(url)}; then "
        f"curl -sS -o /dev/null -X POST {shlex.quote(f'{base}/add_worker?url={url}')} && "
        f"echo {shlex.quote('put back: ' + url)}; else "
        f"echo {shlex.quote('left out, not healthy: ' + url)}; fi" for url in urls)


class Rollout:
    def __init__(self, inventory: str, overrides: list[str], exclude: list[str], out: Path):
        self.inventory, self.out = inventory, out
        self.data_args = [arg for pair in overrides for arg in ("--data", pair)]
        self.exclude_args = [arg for name in exclude for arg in ("--exclude", name)]
        self.runs = 0

    def pyinfra(self, label: str, *args: str) -> tuple[int, str, str]:
        """One pyinfra run, kept in out/NN-label.log as it goes (stdout, then stderr), so that
        an interrupted run leaves what it did: (exit status, stdout, all output)."""
        self.runs += 1
        log = self.out / f"{self.runs:02d}-{label}.log"
        # vLLM's log lines of a failed batch: the owner only.
        with open(os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as sink, \
                tempfile.TemporaryFile("w+") as errors:
            try:
                code = subprocess.run([venv_command("pyinfra"), *args], cwd=REPO, text=True,
                                      stdin=subprocess.DEVNULL, stdout=sink,
                                      stderr=errors).returncode
            finally:
                errors.seek(0)
                stdout, stderr = log.read_text(), errors.read()
                sink.write(stderr)
        return code, stdout, stdout + stderr

    def plan(self) -> tuple[dict | None, str]:
        code, stdout, output = self.pyinfra("plan", self.inventory, "deploy.py", "--dry",
                                            "--json", *self.data_args, *self.exclude_args)
        try:
            return (json.loads(stdout) if code == 0 else None), output
        except ValueError:
            return None, output

    def deploy(self, label: str, hosts: list[str]) -> tuple[int, str]:
        limits = [arg for name in hosts for arg in ("--limit", name)]
        code, _, output = self.pyinfra(label, "-y", *limits, self.inventory, "deploy.py",
                                       *self.data_args)
        if code == 0 and PYINFRA_INTERRUPTED in output:
            code = INTERRUPTED  # pyinfra exits 0 on SIGINT, whatever it left unfinished
        return code, output

    def on_hosts(self, label: str, names: list[str], script: str) -> tuple[int, str]:
        """`script` run by sh on each of `names`, over the inventory's own connections."""
        limits = [arg for name in names for arg in ("--limit", name)]
        code, _, output = self.pyinfra(label, *limits, self.inventory, "exec", "--", "sh",
                                       "-c", shlex.quote(script))
        return code, output

    def on_router(self, label: str, router: Router, script: str) -> tuple[int, str]:
        return self.on_hosts(label, [router.name], script)


def tail(output: str, hosts: list[str], lines: int = 80) -> str:
    """The lines of a pyinfra run's output that concern `hosts` (their errors, vLLM's log
    lines, the restore's verdict), the last `lines` of them."""
    picked = [line for line in output.splitlines()
              if any(f"[{name}]" in line or f"{name}:" in line for name in hosts)]
    return "\n".join(f"    {line.strip()}" for line in picked[-lines:])


@dataclass
class Plan:
    """The roll-out a deploy plan asks for."""

    rolled: list[str]  # trays whose plan restarts vLLM, in inventory order
    rest: list[str]  # hosts with other planned changes only
    batches: list[list[str]]
    size: int
    routers: list[Router]
    urls: dict[str, str]  # rolled tray -> its URL as the routers know it

    def fronting(self, batch: list[str]) -> list[tuple[Router, list[str]]]:
        """Each router in front of a tray of `batch`, with those trays' URLs."""
        pairs = [(router, [self.urls[name] for name in batch if self.urls[name] in
                           router.backends]) for router in self.routers]
        return [(router, urls) for router, urls in pairs if urls]

    def describe(self) -> list[str]:
        lines = [f"rollout: {len(self.rolled)} tray(s) restart vLLM, in {len(self.batches)} "
                 f"batch(es) (canary 1, then {self.size}): {', '.join(self.rolled) or '-'}; "
                 f"other changes: {', '.join(self.rest) or '-'}"]
        for index, batch in enumerate(self.batches, 1):
            behind = ", ".join(router.name for router, _ in self.fronting(batch))
            lines.append(f"rollout:   batch {index}/{len(self.batches)}"
                         f"{' (canary)' if index == 1 else ''}: {', '.join(batch)} "
                         f"(out of {behind or 'no router'} while it restarts)")
        return lines


def plan_of(report: dict, hosts: dict[str, dict], batch: int | None) -> Plan:
    """The roll-out of a dry run's JSON report over an inventory's hosts (tools.inventory's
    output); DataError on bad data (a router's, the batch size)."""
    rolled, rest = restarting(report, list(hosts))
    size = batch_size(hosts, rolled, batch)
    return Plan(rolled, rest, batches_of(rolled, size), size, routers_of(hosts),
                {name: backend_url(name, own_data(hosts[name])) for name in rolled})


def roll(args) -> int:
    started = time.monotonic()
    hosts = inventory_hosts(args.inventory, args.data)  # as the batches will read it
    unknown = sorted(set(args.exclude) - set(hosts))
    if unknown:
        print(f"rollout: nothing rolled: --exclude names no host of {args.inventory}: "
              f"{', '.join(unknown)}", file=sys.stderr)
        return NOT_STARTED
    hosts = {name: data for name, data in hosts.items() if name not in args.exclude}
    out = args.out / time.strftime("%Y%m%dT%H%M%S")
    out.mkdir(mode=0o700, parents=True, exist_ok=True)
    run = Rollout(args.inventory, args.data, args.exclude, out)
    report, output = run.plan()
    if report is None:
        unreachable = sorted({match.group(1) for match in UNREACHABLE.finditer(output)})
        print(output[-3000:], file=sys.stderr)
        if unreachable:
            # Rolling the others would take more trays out while one is already missing:
            # the operator decides, and says so with --exclude.
            excludes = " ".join(f"--exclude {name}" for name in unreachable)
            print(f"rollout: nothing rolled: unreachable: {', '.join(unreachable)}; to roll "
                  f"the others, run again with {excludes} (log in {out})", file=sys.stderr)
            return NOT_STARTED
        print(f"rollout: nothing rolled: pyinfra could not plan the deploy (log in {out})",
              file=sys.stderr)
        return NOT_STARTED
    try:
        plan = plan_of(report, hosts, args.batch)
    except data_keys.DataError as error:
        print(f"rollout: nothing rolled: {error}", file=sys.stderr)
        return NOT_STARTED
    if not plan.rolled and not plan.rest:
        print("rollout: nothing to roll: the plan changes no host")
        return ROLLED
    print("\n".join(plan.describe()), flush=True)
    if args.plan:
        print("rollout: --plan: nothing changed")
        return ROLLED
    print(f"rollout: logs in {out}", flush=True)
    drained: list[tuple[Router, list[str]]] = []  # out of a router right now
    try:
        return rolled_out(run, plan, drained, started, out)
    except KeyboardInterrupt:
        return put_back(run, plan, drained, out)


def put_back(run: Rollout, plan: Plan, drained: list[tuple[Router, list[str]]],
             out: Path) -> int:
    """After Ctrl-C or SIGTERM: what the roll-out took out of the routers goes back once any
    restart its deploy began has ended (settled_script) and it serves (put_back_script);
    every tray is named either way."""
    print("rollout: INTERRUPTED", file=sys.stderr, flush=True)
    out_urls = {url for _, urls in drained for url in urls}
    trays = [name for name, url in plan.urls.items() if url in out_urls]
    try:
        if trays:
            print(f"rollout: waiting for {', '.join(trays)} to end any restart begun before "
                  "the interrupt and to answer /health, then putting them back (Ctrl-C again "
                  "to leave them out)", file=sys.stderr, flush=True)
            run.on_hosts("settle", trays, settled_script())
        for router, urls in drained:
            code, output = run.on_router("put-back", router, put_back_script(router, urls))
            # What the script printed, as pyinfra shows a command's output: "[host] text" (the
            # operation's name, which quotes the script, is on other lines).
            prefix = f"[{router.name}] "
            said = [line.strip()[len(prefix):] for line in output.splitlines()
                    if line.strip().startswith((prefix + "put back: ",
                                                 prefix + "left out, not healthy: "))]
            for line in said:
                print(f"rollout: {router.name}: {line}", file=sys.stderr)
            if code != 0 or len(said) != len(urls):
                print(f"rollout: {router.name}: could not put back {', '.join(urls)}: they "
                      "stay out until the next roll-out or a restart of vllm-router.service",
                      file=sys.stderr)
    except KeyboardInterrupt:
        print("rollout: INTERRUPTED again while putting the batch back: "
              f"{', '.join(url for _, urls in drained for url in urls)} may still be out of the "
              "routers until the next roll-out or a restart of vllm-router.service",
              file=sys.stderr)
        return INTERRUPTED
    print(f"rollout: the interrupted batch's deploy may not have finished: run the roll-out "
          f"again, it rolls what is still to change; logs in {out}", file=sys.stderr)
    return INTERRUPTED


def rolled_out(run: Rollout, plan: Plan, drained: list, started: float, out: Path) -> int:
    """The batches, then the other hosts; `drained` lists, at every moment, the trays this
    has taken out of a router and not yet returned."""
    rolled, rest, batches = plan.rolled, plan.rest, plan.batches
    for index, batch in enumerate(batches, 1):
        label = f"batch {index}/{len(batches)}{' (canary)' if index == 1 else ''}"
        fronting = plan.fronting(batch)
        batch_started = time.monotonic()
        for router, mine in fronting:
            drained.append((router, mine))
            code, output = run.on_router(f"drain-{index}", router, remove_script(router, mine))
            if code != 0:
                print(f"rollout: STOPPED at {label}: {router.name} could not take "
                      f"{', '.join(batch)} out:\n{tail(output, [router.name])}", file=sys.stderr)
                return STOPPED
        print(f"rollout: {label}: {', '.join(batch)} out of "
              f"{', '.join(r.name for r, _ in fronting) or 'no router'}; deploying", flush=True)
        code, output = run.deploy(f"deploy-{index}", batch)
        if code == INTERRUPTED:  # SIGINT reached pyinfra alone: a restart may still be going
            raise KeyboardInterrupt
        back = []
        for router, mine in fronting:
            put, put_output = run.on_router(f"return-{index}", router, add_script(router, mine))
            if put != 0:
                back.append(f"{router.name} has not taken {', '.join(batch)} back:\n"
                            f"{tail(put_output, [router.name])}")
        drained.clear()
        if code != 0 or back:
            reached = {name for done in batches[:index] for name in done}
            untouched = [name for name in rolled if name not in reached]
            causes = tail(output, batch) if code != 0 else ""
            print(f"rollout: STOPPED at {label} ({', '.join(batch)}): "
                  f"{'the deploy failed' if code != 0 else 'the batch is not back in service'}"
                  f"{':' if causes else ''}\n{causes}", file=sys.stderr)
            for line in back:
                print(f"rollout: {line}", file=sys.stderr)
            print(f"rollout: not reached (still on the old release): "
                  f"{', '.join(untouched) or '-'}; logs in {out}", file=sys.stderr)
            return STOPPED
        print(f"rollout: {label}: {', '.join(batch)} healthy and back in "
              f"{time.monotonic() - batch_started:.0f}s", flush=True)
    if rest:
        code, output = run.deploy("rest", rest)
        if code != 0:
            print(f"rollout: STOPPED after every batch: the deploy of "
                  f"{', '.join(rest)} failed:\n{tail(output, rest)}", file=sys.stderr)
            return STOPPED
    print(f"rollout: done: {len(rolled)} tray(s) rolled, {len(rest)} other host(s) "
          f"deployed in {time.monotonic() - started:.0f}s")
    return ROLLED


def interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inventory")
    parser.add_argument("--batch", type=int, help="trays per batch after the canary "
                        "(default: the data key vllm_rollout_batch)")
    parser.add_argument("--data", action="append", default=[], metavar="KEY=VALUE",
                        help="passed to every pyinfra run, as pyinfra's --data")
    parser.add_argument("--out", type=Path, default=REPO / "results" / "rollout")
    parser.add_argument("--exclude", action="append", default=[], metavar="HOST",
                        help="leave this host out (an unreachable tray), as pyinfra's --exclude")
    parser.add_argument("--plan", action="store_true",
                        help="print the batches the plan asks for, change nothing")
    args = parser.parse_args(argv)
    if args.batch is not None and args.batch < 1:
        parser.error("--batch must be at least 1")
    if any("=" not in pair for pair in args.data):
        parser.error("--data takes KEY=VALUE")
    missing = missing_packages("rollout", "pyinfra", prefix="nothing rolled: ")
    if missing:
        print(missing, file=sys.stderr)
        return NOT_STARTED
    # SIGTERM (systemd, a CI job's timeout) ends a roll-out as Ctrl-C does: batch put back.
    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        return roll(args)
    except KeyboardInterrupt:  # while loading the inventory or planning (roll() takes the rest)
        print("rollout: INTERRUPTED before any tray left a router: nothing rolled",
              file=sys.stderr)
        return INTERRUPTED
    except RuntimeError as error:  # the inventory could not be loaded
        print(f"rollout: nothing rolled: {error}", file=sys.stderr)
        return NOT_STARTED
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
