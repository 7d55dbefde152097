"""bench.py against the deployed e2e sandbox: the sandbox workload runs on every host from the
host's own vLLM venv, waits for /health when the service was just restarted, and brings the
results home; bench-report then compares them, charts them and flags a doctored
baseline. The default (seed) workload cannot fit the sandbox's context and is refused before
any request. Runs after the deploy and drift modules (name order), on the converged hosts."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from datetime import datetime, timezone

import pytest
from PIL import Image

from tasks.bench import WORKLOADS, serve_args_digest
from tasks.models import PROFILES
from tasks.settings import read_settings
from tests.e2e.common import ENV, PYINFRA, api_key, service_start
from tests.helpers import REPO, FakeHost, group_data
from tools import bench_report

WORKLOAD = WORKLOADS["sandbox"]




def run_bench_report(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tools.bench_report", *args],
                          cwd=REPO, env=ENV, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def bench_run(sandbox, hosts):
    """One bench.py run, started right after a restart of vllm.service on the first host:
    only the health gate stands between the benchmark and a server still loading."""
    run_id = f"e2e-{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}"
    first = sandbox["hosts"][0]["name"]
    before = service_start(hosts[first])
    hosts[first].check_output("systemctl restart vllm.service")
    process = subprocess.Popen(
        [PYINFRA, "-y", "inventories/sandbox.py", "bench.py", "--data", "bench_profile=sandbox",
         "--data", f"bench_run_id={run_id}"],
        cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    # What every process on the hosts showed as its arguments while the benchmark ran.
    process_lists = []
    deadline = time.monotonic() + 900
    while process.poll() is None and time.monotonic() < deadline:
        process_lists += [host.check_output("ps -eo args") for host in hosts.values()]
        time.sleep(1)
    if process.poll() is None:
        process.kill()
    output = process.communicate()[0]
    assert process.returncode == 0, output[-5000:]
    return {"output": output, "run_id": run_id, "restarted": first, "start_before": before,
            "process_lists": process_lists, "dir": REPO / "results" / "bench" / run_id}


def test_every_host_result_came_home_with_no_failed_request(bench_run, sandbox):
    for host in sandbox["hosts"]:
        result = json.loads((bench_run["dir"] / f"{host['name']}.json").read_text())
        assert (result["completed"], result["failed"]) == (WORKLOAD.num_prompts, 0)
        assert result["total_output_tokens"] == WORKLOAD.num_prompts * WORKLOAD.output_len
        assert result["output_throughput"] > 0 and result["mean_ttft_ms"] > 0


def test_the_restarted_host_was_benchmarked_only_once_healthy(bench_run, hosts):
    # The restart really happened, and still no request failed: the gate waited for /health.
    assert service_start(hosts[bench_run["restarted"]]) != bench_run["start_before"]
    result = json.loads((bench_run["dir"] / f"{bench_run['restarted']}.json").read_text())
    assert result["failed"] == 0
    operations = [line for line in bench_run["output"].splitlines()
                  if line.startswith("--> Starting operation:")]
    assert "Wait for vLLM /health" in operations[0]


def test_results_carry_the_metadata_that_makes_them_comparable(bench_run, sandbox):
    for host in sandbox["hosts"]:
        name = host["name"]
        result = json.loads((bench_run["dir"] / f"{name}.json").read_text())
        settings = read_settings(FakeHost(name, {**group_data("sandbox"),
                                           "vllm_api_key_file": sandbox["api_key_file"]}))
        assert result["host"] == name
        assert result["runtime"] == "venv"
        assert result["vllm_version"].startswith("0.32.0")
        assert (result["model_repo"], result["model_revision"]) == ("sandbox/tiny-kimi", "main")
        assert result["serve_args_sha256"] == serve_args_digest(settings.serve_args)
        assert (result["bench_profile"], result["run_id"]) == ("sandbox", bench_run["run_id"])
        started = datetime.strptime(result["date"], "%Y-%m-%dT%H:%M:%SZ")
        assert abs((datetime.now(timezone.utc).replace(tzinfo=None) - started).total_seconds()) \
            < 900


def test_metrics_scrapes_bracket_the_run(bench_run, sandbox):
    for host in sandbox["hosts"]:
        before = bench_report.parse_prometheus(
            (bench_run["dir"] / f"{host['name']}.metrics-before.prom").read_text())
        after = bench_report.parse_prometheus(
            (bench_run["dir"] / f"{host['name']}.metrics-after.prom").read_text())
        generated = after["vllm:generation_tokens_total"] - before["vllm:generation_tokens_total"]
        assert generated >= WORKLOAD.num_prompts * WORKLOAD.output_len
        # No draft in the sandbox: no acceptance to report, rather than a made-up one.
        assert bench_report.speculative_from_scrapes(
            (bench_run["dir"] / f"{host['name']}.metrics-before.prom").read_text(),
            (bench_run["dir"] / f"{host['name']}.metrics-after.prom").read_text()) is None


def test_the_api_key_appears_in_no_output_no_result_and_no_process(bench_run, sandbox):
    key = api_key(sandbox)
    assert key not in bench_run["output"]
    for path in bench_run["dir"].iterdir():
        assert key not in path.read_text(errors="replace"), path.name
    # The polls caught the client at work, and its arguments never held the key.
    assert any("vllm bench serve" in listing for listing in bench_run["process_lists"])
    assert not [listing for listing in bench_run["process_lists"] if key in listing]


def test_report_against_the_same_run_passes_and_charts_every_host(bench_run, sandbox):
    out = bench_run["dir"] / "self"
    result = run_bench_report("compare", str(bench_run["dir"]), "--baseline", str(bench_run["dir"]),
                          "--out", str(out))
    assert result.returncode == 0, result.stdout + result.stderr
    names = [host["name"] for host in sandbox["hosts"]]
    for name in names:
        assert f"## {name}" in result.stdout
        assert f"No regression on {name}." in result.stdout
    assert "| Output token throughput (tok/s) |" in (out / "report.md").read_text()
    with Image.open(out / "report.png") as image:
        image.verify()
    with Image.open(out / "report.png") as image:
        assert image.format == "PNG" and image.size[0] > 600
        series = json.loads(image.text["Series"])
    assert series[len(names):] == names
    assert all(label.startswith("baseline ") for label in series[:len(names)])


def test_report_against_a_doctored_baseline_exits_1_naming_the_regression(bench_run, sandbox,
                                                                         tmp_path):
    name = sandbox["hosts"][0]["name"]
    doctored = json.loads((bench_run["dir"] / f"{name}.json").read_text())
    doctored["output_throughput"] *= 2  # as if the last run had been twice as fast
    (tmp_path / f"{name}.json").write_text(json.dumps(doctored))
    result = run_bench_report("compare", str(bench_run["dir"] / f"{name}.json"),
                          "--baseline", str(tmp_path / f"{name}.json"), "--out", str(tmp_path))
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"**REGRESSION** on {name}: Output token throughput" in result.stdout


def test_report_against_the_seed_refuses_to_call_different_work_a_regression(bench_run):
    result = run_bench_report("compare", str(bench_run["dir"]), "--out",
                          str(bench_run["dir"] / "seed"))
    assert result.returncode == 2, result.stdout + result.stderr
    assert "the workloads differ (bench_profile sandbox vs seed-8k-1k" in result.stdout


def chat_requests(address: str) -> float:
    """Chat completion requests the server has answered, whatever their status: the
    `http_requests_total` samples of that handler on its /metrics."""
    with urllib.request.urlopen(f"http://{address}:8000/metrics", timeout=30) as response:
        lines = response.read().decode().splitlines()
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines
               if line.startswith("http_requests_total{")
               and 'handler="/v1/chat/completions"' in line)


def test_the_seed_workload_is_refused_before_any_request(sandbox):
    """The sandbox serves a 2048-token context: the seed's 8000 + 1024 tokens cannot fit. The
    run fails naming the limit, sends no request and keeps no result (it once sent all 32,
    each answered "Bad Request", and said Success with 0 tok/s)."""
    extra = PROFILES["sandbox-tiny"].extra_args
    max_model_len = extra[extra.index("--max-model-len") + 1]
    seed = WORKLOADS["seed-8k-1k"]
    run_id = f"e2e-refused-{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}"
    before = {host["name"]: chat_requests(host["address"]) for host in sandbox["hosts"]}
    assert all(count > 0 for count in before.values())  # the counter is real: earlier chats
    result = subprocess.run(
        [PYINFRA, "-y", "inventories/sandbox.py", "bench.py", "--data", f"bench_run_id={run_id}"],
        cwd=REPO, env=ENV, capture_output=True, text=True, timeout=900)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output[-3000:]
    for host in sandbox["hosts"]:
        assert (f"{host['name']}: bench_profile: found '{seed.name}', {seed.input_len} input "
                f"+ {seed.output_len} output = {seed.context_len} tokens per request; need at "
                f"most the served model's max_model_len of {max_model_len}") in output, \
            output[-3000:]
    assert "Starting operation: Benchmark | Check that workload seed-8k-1k" in output
    # No tray reached the benchmark (a router host, which runs none, may be listed there).
    section = output.partition("Starting operation: Benchmark | Benchmark the endpoint")[2]
    assert not [h["name"] for h in sandbox["hosts"]
                if f"[{h['name']}]" in section.split("--> ", 1)[0]]
    assert {host["name"]: chat_requests(host["address"]) for host in sandbox["hosts"]} == before
    assert not (REPO / "results" / "bench" / run_id).exists()
    assert api_key(sandbox) not in output

