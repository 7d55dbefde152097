"""tools/rollout.py on the e2e fleet (three trays behind the router e2er1), with a steady stream
of chat requests through the router the whole time: a rolling config change loses no request,
and a release vLLM rejects stops at the canary, which is put back on its last good release
while the trays not reached keep serving; Ctrl-C mid-batch puts the batch back. Runs after
the infra suite (name order)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.e2e.common import ENV, ROUTER_PORT, Stream, api_key, exec_start, service_start
from tests.helpers import REPO


def rollout(*args: str) -> tuple[subprocess.CompletedProcess, float]:
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "tools.rollout", "inventories/sandbox.py",
                             *args], cwd=REPO, env=ENV, capture_output=True, text=True,
                            timeout=1500, stdin=subprocess.DEVNULL)
    return result, time.monotonic() - started


def workers(router, address: str) -> dict[str, bool]:
    """The router's rotation as it reports it, asked on its own host."""
    answer = json.loads(router.check_output(f"curl -fsS http://{address}:{ROUTER_PORT}/workers"))
    return {worker["url"]: worker["is_healthy"] for worker in answer["workers"]}


def journal(host, unit: str, lines: int = 40) -> str:
    """A unit's last log lines with their times, to read beside a stream's failures."""
    return host.run(f"journalctl -u {unit} -n {lines} -o short-precise --no-pager").stdout


@pytest.fixture(scope="module")
def stream_target(sandbox):
    return sandbox["routers"][0]["address"], api_key(sandbox)


def test_a_rolling_change_goes_batch_by_batch_and_loses_no_request(hosts, stream_target):
    before = {name: service_start(host) for name, host in hosts.items()}
    address, key = stream_target
    with Stream(address, key, ROUTER_PORT) as stream:
        time.sleep(5)  # the stream runs before the first tray leaves
        result, wall_s = rollout("--batch", "2", "--data", "vllm_shutdown_timeout_s=30")
        time.sleep(5)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-5000:]
    print(f"\nrollout of 3 trays (canary 1, then 2): {wall_s:.0f}s; "
          f"{stream.answered} requests answered, {len(stream.failures)} failed")
    assert stream.failures == [], stream.failures[:5]
    assert stream.answered > 30
    assert "batch 1/2 (canary): e2e1 out of e2er1" in output
    assert "batch 2/2: e2e2, e2e3 out of e2er1" in output
    assert "rollout: done: 3 tray(s) rolled" in output
    for name, host in hosts.items():
        assert service_start(host) != before[name], f"{name} was not restarted"
        assert "--shutdown-timeout 30" in exec_start(host)


def test_a_release_vllm_rejects_stops_at_the_canary_which_serves_the_last_good_one(
        hosts, routers, stream_target):
    before = {name: (service_start(host), exec_start(host)) for name, host in hosts.items()}
    address, key = stream_target
    with Stream(address, key, ROUTER_PORT) as stream:
        result, wall_s = rollout("--data", 'vllm_extra_args=["--no-such-flag"]')
        time.sleep(5)
    output = result.stdout + result.stderr
    print(f"\nrejected release stopped at the canary and rolled back: {wall_s:.0f}s; "
          f"{stream.answered} requests answered, {len(stream.failures)} failed")
    assert result.returncode == 1, output[-5000:]
    assert "rollout: STOPPED at batch 1/3 (canary) (e2e1): the deploy failed" in output
    assert "e2e1: vllm.service exited before it answered http://127.0.0.1:8000/health" in output
    assert "e2e1: the last good release serves again" in output
    assert "rollout: not reached (still on the old release): e2e2, e2e3" in output
    assert stream.failures == [], stream.failures[:5]
    # The canary runs its last good release again; the others were never touched.
    canary = hosts["e2e1"]
    assert canary.service("vllm").is_running
    assert exec_start(canary) == before["e2e1"][1]
    assert "--no-such-flag" not in canary.file("/etc/systemd/system/vllm.service").content_string
    for name in ("e2e2", "e2e3"):
        assert (service_start(hosts[name]), exec_start(hosts[name])) == before[name]
    [router] = routers.values()
    assert workers(router, address) == {f"http://{host.backend.hostname}:8000": True
                                        for host in hosts.values()}


def test_ctrl_c_mid_batch_puts_the_canary_back_and_a_second_run_finishes(hosts, routers,
                                                                        stream_target):
    """Ctrl-C (SIGINT to the roll-out's process group, as a terminal sends it) while the canary
    is out of the router and its deploy runs (pyinfra dies; a restart it asked for goes on in
    systemd): the canary goes back once it serves, exit 130, no request lost; the same command
    again rolls everything."""
    address, key = stream_target
    change = ("--data", "vllm_shutdown_timeout_s=31")
    # The roll-out takes SIGINT as a terminal's foreground job does, even where this run was
    # started in the background (`cmd &` starts it with SIGINT ignored, and children inherit
    # that): a handler here is reset to the default in the child.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    with Stream(address, key, ROUTER_PORT) as stream:
        running = subprocess.Popen([sys.executable, "-m", "tools.rollout", "inventories/sandbox.py",
                                    *change], cwd=REPO, env=ENV, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True, start_new_session=True,
                                   stdin=subprocess.DEVNULL)
        signal.signal(signal.SIGINT, previous)
        seen = []
        for line in running.stdout:
            seen.append(line)
            if "(canary): e2e1 out of e2er1; deploying" in line:
                break
        assert running.poll() is None, "".join(seen)[-3000:]  # the canary is out: mid-batch
        time.sleep(2)  # the canary's deploy has started (it reaches the restart in ~3 s)
        os.killpg(running.pid, signal.SIGINT)
        output = "".join(seen) + running.stdout.read()
        assert running.wait(timeout=1200) == 130, output[-5000:]
        time.sleep(5)
    print(f"\ninterrupted roll-out: {stream.answered} requests answered, "
          f"{len(stream.failures)} failed")
    assert "rollout: INTERRUPTED" in output
    # Whether the interrupt came before the canary's restart or during it, the canary serves
    # (the old release, or the new one once its restart ended) and goes back.
    assert "rollout: e2er1: put back: http://" in output, output[-3000:]
    [router] = routers.values()
    assert stream.failures == [], (stream.failures[:5], output[-3000:],
                                   journal(router, "vllm-router"), journal(hosts["e2e1"], "vllm"))
    assert not [name for name in ("e2e2", "e2e3")
                if "--shutdown-timeout 31" in exec_start(hosts[name])]
    result, _ = rollout(*change)
    assert result.returncode == 0, (result.stdout + result.stderr)[-5000:]
    for host in hosts.values():
        assert "--shutdown-timeout 31" in exec_start(host)
    assert workers(router, address) == {f"http://{host.backend.hostname}:8000": True
                                        for host in hosts.values()}
