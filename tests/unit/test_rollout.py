"""tools/rollout.py's decisions: which trays roll, in which batches, behind which routers, and
the shell it runs on a router host. The roll-out itself (real routers, real trays, requests
streaming through) is tests/e2e/test_s_rollout.py."""

from __future__ import annotations

import http.server
import ipaddress
import json
import os
import signal
import ssl
import subprocess
import threading
import time
from urllib.parse import parse_qs, urlparse

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from tasks.data_keys import DEFAULTS, DataError
from tasks.vllm_service import RESTART_OPERATION
from tools import rollout
from tests.unit.test_tls import certificate, pem
from tests.unit.test_vllm_router import wheelhouse  # noqa: F401 (a fixture)


def test_the_first_batch_is_a_canary_of_one_then_batches_of_the_given_size():
    assert rollout.batches_of([], 3) == []
    assert rollout.batches_of(["a"], 3) == [["a"]]
    assert rollout.batches_of(["a", "b", "c", "d"], 2) == [["a"], ["b", "c"], ["d"]]
    assert rollout.batches_of(["a", "b", "c"], 1) == [["a"], ["b"], ["c"]]


def test_only_trays_whose_plan_restarts_vllm_are_rolled_in_inventory_order():
    report = {"plan": [
        {"name": "System | Install packages", "hosts_with_change": ["t3"]},
        {"name": RESTART_OPERATION, "hosts_with_change": ["t3", "t1"]},
        {"name": "vLLM router | Install vllm-router.service unit (3 backends)",
         "hosts_with_change": ["r1"]},
        {"name": "Model weights | Place", "hosts_with_change": []},
    ]}
    assert rollout.restarting(report, ["t1", "t2", "t3", "r1"]) == (["t1", "t3"], ["r1"])
    assert rollout.restarting({"plan": []}, ["t1"]) == ([], [])


def inventory(wheelhouse: str, **router) -> dict[str, dict]:
    """Hosts as tools.inventory prints them: name -> data with `_groups`."""
    trays = {f"t{n}": {**DEFAULTS, "ssh_hostname": f"10.0.0.1{n}", "_groups": ["sandbox"]}
             for n in (1, 2, 3)}
    return {**trays, "r1": {**DEFAULTS, "router_wheelhouse_dir": wheelhouse, **router,
                            "_groups": ["router"]}}


def test_routers_front_the_serving_hosts_and_are_called_on_their_own_host(wheelhouse):  # noqa: F811
    hosts = inventory(wheelhouse)
    [router] = rollout.routers_of(hosts)
    assert router.name == "r1"
    assert router.local_url == "http://127.0.0.1:30000"
    assert router.backends == ("http://10.0.0.11:8000", "http://10.0.0.12:8000",
                               "http://10.0.0.13:8000")
    # Its own health wait's timeout: start-up, two probe rounds, margin.
    assert router.health_timeout_s == 30 + 2 * 10 + 60


def test_the_batch_size_is_the_flag_else_the_first_rolled_trays_data(wheelhouse):  # noqa: F811
    hosts = inventory(wheelhouse)
    hosts["t2"]["vllm_rollout_batch"] = 2
    assert rollout.batch_size(hosts, ["t2", "t3"], None) == 2
    assert rollout.batch_size(hosts, ["t1"], None) == 1
    assert rollout.batch_size(hosts, ["t1"], 4) == 4
    hosts["t3"]["vllm_rollout_batch"] = 0
    with pytest.raises(DataError, match="t3: vllm_rollout_batch: found 0; need a positive"):
        rollout.batch_size(hosts, ["t3"], None)


def test_bad_arguments_are_refused_before_anything_runs(capsys):
    with pytest.raises(SystemExit):
        rollout.main(["inventories/sandbox.py", "--batch", "0"])
    assert "--batch must be at least 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        rollout.main(["inventories/sandbox.py", "--data", "vllm_port"])
    assert "--data takes KEY=VALUE" in capsys.readouterr().err


def test_an_inventory_that_does_not_load_rolls_nothing(tmp_path, capsys):
    bad = tmp_path / "inventory.py"
    bad.write_text("raise SystemExit('no such fleet')\n")
    assert rollout.main([str(bad), "--out", str(tmp_path / "out")]) == rollout.NOT_STARTED
    assert "rollout: nothing rolled: cannot load inventory" in capsys.readouterr().err


class AdminStub(http.server.BaseHTTPRequestHandler):
    """Test double of vllm-router's admin routes (/add_worker, /remove_worker, /workers,
    /health): the real router runs in the e2e; here the scripts' HTTP conversation is checked
    without one. `healthy_after` GETs of /health answer 503 before it says 200."""

    workers: list[str] = []
    calls: list[str] = []
    healthy_after = 0

    def log_message(self, *args):
        pass

    def reply(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):
        url = urlparse(self.path)
        worker = parse_qs(url.query)["url"][0]
        type(self).calls.append(f"{url.path} {worker}")
        if url.path == "/remove_worker" and worker in self.workers:
            self.workers.remove(worker)
        elif url.path == "/add_worker" and worker not in self.workers:
            self.workers.append(worker)
        self.reply(200, {})

    def do_GET(self):
        if self.path == "/workers":
            self.reply(200, {"workers": [{"url": url, "is_healthy": True}
                                         for url in self.workers]})
        else:
            type(self).healthy_after -= 1
            self.reply(200 if self.healthy_after < 0 else 503, {})


@pytest.fixture
def admin():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), AdminStub)
    AdminStub.workers = ["http://10.0.0.11:8000", "http://10.0.0.12:8000"]
    AdminStub.calls, AdminStub.healthy_after = [], 2
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield rollout.Router("r1", f"http://127.0.0.1:{server.server_address[1]}",
                         tuple(AdminStub.workers), health_timeout_s=5)
    server.shutdown()


def test_a_batch_is_taken_out_then_back_and_waited_healthy(admin):
    batch = ["http://10.0.0.12:8000"]
    assert subprocess.run(["sh", "-c", rollout.remove_script(admin, batch)]).returncode == 0
    assert AdminStub.workers == ["http://10.0.0.11:8000"]
    # Removing it again (a roll-out interrupted before) is no error.
    assert subprocess.run(["sh", "-c", rollout.remove_script(admin, batch)]).returncode == 0
    result = subprocess.run(["sh", "-c", rollout.add_script(admin, batch)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert AdminStub.workers == ["http://10.0.0.11:8000", "http://10.0.0.12:8000"]
    assert AdminStub.healthy_after < 0  # it waited through the 503s
    assert AdminStub.calls == ["/remove_worker http://10.0.0.12:8000"] * 2 + [
        "/add_worker http://10.0.0.12:8000"]


def test_a_batch_the_router_never_reports_healthy_fails_after_its_timeout(admin):
    AdminStub.healthy_after = 10 ** 6
    result = subprocess.run(["sh", "-c", rollout.add_script(admin, ["http://10.0.0.12:8000"])],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert "not every worker healthy within 5s:" in result.stderr


def test_the_plan_names_each_batch_and_the_routers_it_leaves(wheelhouse):  # noqa: F811
    report = {"plan": [{"name": RESTART_OPERATION, "hosts_with_change": ["t1", "t2", "t3"]},
                       {"name": "vLLM router | Install vllm-router.service unit (3 backends)",
                        "hosts_with_change": ["r1"]}]}
    plan = rollout.plan_of(report, inventory(wheelhouse), 2)
    assert plan.batches == [["t1"], ["t2", "t3"]]
    assert plan.describe() == [
        "rollout: 3 tray(s) restart vLLM, in 2 batch(es) (canary 1, then 2): t1, t2, t3; "
        "other changes: r1",
        "rollout:   batch 1/2 (canary): t1 (out of r1 while it restarts)",
        "rollout:   batch 2/2: t2, t3 (out of r1 while it restarts)"]
    [(router, urls)] = plan.fronting(["t2", "t3"])
    assert (router.name, urls) == ("r1", ["http://10.0.0.12:8000", "http://10.0.0.13:8000"])


def test_a_tray_behind_no_router_rolls_without_a_drain(wheelhouse):  # noqa: F811
    hosts = inventory(wheelhouse, router_backend_group="other")
    hosts["t1"]["_groups"] = ["sandbox", "other"]
    report = {"plan": [{"name": RESTART_OPERATION, "hosts_with_change": ["t1", "t2"]}]}
    plan = rollout.plan_of(report, hosts, None)
    assert plan.fronting(["t2"]) == []
    assert plan.describe()[2] == "rollout:   batch 2/2: t2 (out of no router while it restarts)"


def test_an_unreachable_host_stops_the_roll_out_before_it_starts_and_is_named(tmp_path, capsys):
    """Real pyinfra against a host whose SSH port is closed (127.0.0.1:1)."""
    inventory = tmp_path / "inventory.py"
    inventory.write_text('trays = [("ghost", {"ssh_hostname": "127.0.0.1", "ssh_port": 1}), '
                         '("other", {"ssh_hostname": "127.0.0.1", "ssh_port": 1})]\n')
    code = rollout.main([str(inventory), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == rollout.NOT_STARTED
    assert ("rollout: nothing rolled: unreachable: ghost, other; to roll the others, run again "
            "with --exclude ghost --exclude other") in err
    assert rollout.main([str(inventory), "--exclude", "ghost", "--exclude", "nobody"]) == \
        rollout.NOT_STARTED
    assert "--exclude names no host of" in capsys.readouterr().err


def test_each_run_is_logged_for_the_owner_only(tmp_path):
    out = tmp_path / "run"
    out.mkdir(mode=0o700)
    run = rollout.Rollout("inventories/none.py", ["vllm_port=8001"], ["t9"], out)
    assert run.data_args == ["--data", "vllm_port=8001"]
    assert run.exclude_args == ["--exclude", "t9"]
    code, _, output = run.pyinfra("version", "--version")
    assert code == 0 and "pyinfra" in output.lower()
    log = out / "01-version.log"
    assert log.read_text() == output and (log.stat().st_mode & 0o777) == 0o600


@pytest.fixture
def ctrl_c():
    """Python's own SIGINT handler (KeyboardInterrupt), as `rollout` has in a terminal: a test
    run started in the background (`make test &`) inherits SIGINT ignored, and Python then
    leaves it so."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


def test_an_interrupted_run_keeps_what_it_printed_in_its_log(tmp_path, monkeypatch, ctrl_c):
    """Ctrl-C during a batch's deploy: its log still says how far pyinfra got. Test double:
    a script in pyinfra's place that prints and waits to be stopped."""
    fake = tmp_path / "pyinfra"
    fake.write_text("#!/bin/sh\necho '--> Starting operation: Enable and start vllm.service'\n"
                    "echo 'a warning' >&2\nexec sleep 60\n")
    fake.chmod(0o755)
    monkeypatch.setattr(rollout, "venv_command", lambda name: str(fake))
    out = tmp_path / "run"
    out.mkdir(mode=0o700)
    run = rollout.Rollout("inventory.py", [], [], out)
    threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGINT)).start()
    with pytest.raises(KeyboardInterrupt):
        run.pyinfra("deploy-1", "-y", "inventory.py", "deploy.py")
    log = out / "01-deploy-1.log"
    assert log.read_text() == ("--> Starting operation: Enable and start vllm.service\n"
                               "a warning\n")
    assert log.stat().st_mode & 0o777 == 0o600


def test_after_an_interruption_only_a_tray_that_serves_is_put_back(admin):
    """The put-back after Ctrl-C: the stub's own /health stands in for a tray that serves
    after two probes (a restart the deploy began, loading); port 1 on loopback for one that
    never comes back within the wait."""
    AdminStub.workers, AdminStub.healthy_after = [], 2
    serving, restarting = admin.local_url, "http://127.0.0.1:1"
    started = time.monotonic()
    result = subprocess.run(["sh", "-c", rollout.put_back_script(admin, [serving, restarting],
                                                                 wait_s=4)],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [f"put back: {serving}",
                                          f"left out, not healthy: {restarting}"]
    assert AdminStub.workers == [serving]
    assert time.monotonic() - started >= 3  # it waited for the dead one, once (one deadline)


def test_an_https_tray_is_put_back_trusting_the_routers_ca_for_its_trays(admin, tmp_path):
    """A tray serving TLS signed by a private CA answers the put-back's /health only to a
    client trusting that CA (the file tasks/vllm_router.py places on the router host): the
    stub's /health, served over https with a certificate the test makes, stands in for it."""
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = certificate(ca_key, ca_key, "test CA", "test CA", 30, ca=True)
    names = [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    other_key = ec.generate_private_key(ec.SECP256R1())
    other = certificate(other_key, other_key, "other CA", "other CA", 30, ca=True)
    for name, thing in (("ca.pem", ca), ("other-ca.pem", other), ("key.pem", key),
                        ("cert.pem", certificate(key, ca_key, "tray", "test CA", 30, names))):
        (tmp_path / name).write_bytes(pem(thing))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), AdminStub)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    tray = f"https://127.0.0.1:{server.server_address[1]}"
    try:
        for ca_file, said in ((tmp_path / "ca.pem", "put back"),
                              (tmp_path / "other-ca.pem", "left out, not healthy")):
            AdminStub.workers, AdminStub.healthy_after = [], 0
            result = subprocess.run(
                ["sh", "-c", rollout.put_back_script(admin, [tray], wait_s=2,
                                                     ca_file=str(ca_file))],
                capture_output=True, text=True, timeout=30)
            assert result.stdout.splitlines() == [f"{said}: {tray}"], result.stderr
        assert rollout.BACKENDS_CA in rollout.put_back_script(admin, [tray])
        assert "--cacert" not in rollout.put_back_script(admin, ["http://10.0.0.11:8000"])
    finally:
        server.shutdown()


def test_after_an_interruption_a_tray_settles_before_its_health_is_believed(tmp_path):
    """settled_script waits while systemd lists a job of vllm.service (a restart the killed
    deploy began: the old server still answers /health while it stops). Test double:
    `systemctl` on PATH lists a running restart twice, then none (real systemd runs it in the
    e2e, tests/e2e/test_s_rollout.py)."""
    count = tmp_path / "count"
    fake = tmp_path / "systemctl"
    fake.write_text(f"#!/bin/sh\necho x >> {count}\n"
                    f"[ $(wc -l < {count}) -le 2 ] && echo '7 vllm.service restart running'\n"
                    "exit 0\n")
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"}
    result = subprocess.run(["sh", "-c", rollout.settled_script()], env=env, timeout=30)
    assert result.returncode == 0
    assert len(count.read_text().splitlines()) == 3  # asked until no job was left
    count.write_text("")
    fake.write_text("#!/bin/sh\necho '7 vllm.service restart running'\n")  # stuck
    started = time.monotonic()
    subprocess.run(["sh", "-c", rollout.settled_script(timeout_s=2)], env=env, timeout=30)
    assert 1 <= time.monotonic() - started < 10  # bounded


def test_a_deploy_pyinfra_ended_on_sigint_is_not_taken_for_done(tmp_path, monkeypatch):
    """pyinfra exits 0 when SIGINT stops it mid-run: the roll-out reads its words instead."""
    run = rollout.Rollout("inventory.py", [], [], tmp_path)
    monkeypatch.setattr(run, "pyinfra", lambda *args: (0, "", "--> Starting operation: "
                                                       "Enable ...\nExiting upon user request!\n"))
    assert run.deploy("deploy-1", ["t1"])[0] == rollout.INTERRUPTED
    monkeypatch.setattr(run, "pyinfra", lambda *args: (0, "", "--> Disconnecting\n"))
    assert run.deploy("deploy-1", ["t1"])[0] == 0


class Recorded(rollout.Rollout):
    """Test double of the pyinfra runs (the real ones are tests/e2e/test_s_rollout.py): the
    plan restarts t1 and t2, the router calls are recorded and answered, and the canary's
    deploy is where the operator presses Ctrl-C (or systemd sends SIGTERM)."""

    calls: list[tuple[str, str]] = []
    where: list[tuple[str, list[str]]] = []
    signal = signal.SIGINT

    def plan(self):
        return {"plan": [{"name": RESTART_OPERATION, "hosts_with_change": ["t1", "t2"]}]}, ""

    def deploy(self, label, hosts):
        type(self).calls.append((label, " ".join(hosts)))
        if self.signal is None:  # SIGINT reached pyinfra alone, which exits 0 (Rollout.deploy)
            return rollout.INTERRUPTED, "Exiting upon user request!"
        os.kill(os.getpid(), self.signal)
        time.sleep(5)  # the signal arrives here
        raise AssertionError("no signal arrived")

    def on_hosts(self, label, names, script):
        type(self).calls.append((label, script))
        type(self).where.append((label, names))
        # As pyinfra prints it: the operation's name quotes the script, then the output.
        said = ("put back: http://10.0.0.11:8000" if label == "put-back" else "")
        return 0, "".join(f"--> Starting operation: server.shell (sh -c {script!r})\n"
                          f"[{name}] {said}\n" for name in names)


@pytest.mark.parametrize("sent", [signal.SIGINT, signal.SIGTERM, None])
def test_ctrl_c_during_a_batch_puts_it_back_and_exits_130(wheelhouse, monkeypatch, tmp_path,  # noqa: F811
                                                          capsys, sent, ctrl_c):
    monkeypatch.setattr(rollout, "inventory_hosts", lambda *args: inventory(wheelhouse))
    monkeypatch.setattr(rollout, "Rollout", Recorded)
    monkeypatch.setattr(Recorded, "signal", sent)
    Recorded.calls, Recorded.where = [], []
    before = signal.getsignal(signal.SIGTERM)
    assert rollout.main(["inventory.py", "--out", str(tmp_path)]) == rollout.INTERRUPTED
    assert signal.getsignal(signal.SIGTERM) == before  # pytest's own, back
    # The canary only (t2 never touched): out of r1, deployed, settled on t1, put back by r1.
    assert Recorded.where == [("drain-1", ["r1"]), ("settle", ["t1"]), ("put-back", ["r1"])]
    assert [label for label, _ in Recorded.calls] == ["drain-1", "deploy-1", "settle",
                                                      "put-back"]
    assert "systemctl list-jobs --no-legend vllm.service" in Recorded.calls[2][1]
    assert "http://10.0.0.11:8000/health" in Recorded.calls[3][1]
    err = capsys.readouterr().err
    assert "rollout: INTERRUPTED" in err
    assert "rollout: r1: put back: http://10.0.0.11:8000" in err
    assert "could not put back" not in err and err.count("put back: ") == 1
    assert "run the roll-out again, it rolls what is still to change" in err
