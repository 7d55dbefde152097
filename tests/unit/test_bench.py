"""tasks/bench.py and bench.py: the `vllm bench serve` command is the seed's (section 6.1), flag
by flag, run by each runtime's own vLLM (the venv, or a container of the pinned image); the
host-side scripts keep the API key out of every command line, refuse a workload longer than the
served context before any request, and fail a run with any failed request; bench data is
validated."""

from __future__ import annotations

import json
import os
import re
import runpy
import shlex
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from pyinfra.api import Config, Inventory, State, StringCommand
from pyinfra.api.connect import connect_all
from pyinfra.api.deploy import add_deploy

from tasks.bench import (WORKLOADS, BenchSettings, bench_script, bench_serve_args, client_argv,
                         context_check_script, read_bench_settings, result_check, serve_args_digest)
from tasks.facts import CpuArchitecture
from tasks.data_keys import DataError
from tasks.settings import ENV_FILE, read_settings
from tasks.vllm_service import env_file_content
from tests.helpers import (REPO, FakeHost, fact_command, group_data, planned_commands,
                           seed_benchmarks_text)

API_KEY = "s3cret-bench-key"
# argparse accepts unambiguous prefixes and vLLM's parser underscores: the seed used both.
SEED_FLAG_SPELLINGS = {"--random-input": "--random-input-len",
                       "--random-output": "--random-output-len"}


@pytest.fixture
def host_data(tmp_path, controller_folders):
    """Group data for a host, with its controller artefacts stubbed by small real folders."""
    key = tmp_path / "api-key"
    key.write_text(API_KEY + "\n")

    def data(group: str, **overrides) -> dict:
        values = group_data(group)
        values.update(controller_folders,
                      vllm_api_key_file=str(key), bench_results_dir="results/bench",
                      bench_host_dir="/var/lib/vllm-bench", bench_run_id=None)
        values.update(overrides)
        return values

    return data


def seed_bench_flags() -> dict[str, str | None]:
    """The seed's `vllm bench serve` flags (section 6.1), spelled as vLLM's parser reads them."""
    lines = seed_benchmarks_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("vllm bench serve"))
    command = []
    for line in lines[start:]:
        command.append(line.rstrip("\\ "))
        if not line.rstrip().endswith("\\"):
            break
    tokens = shlex.split(" ".join(command))[3:]
    flags: dict[str, str | None] = {}
    for index, token in enumerate(tokens):
        if token.startswith("--"):
            name = token.replace("_", "-")
            value = tokens[index + 1] if index + 1 < len(tokens) else None
            flags[SEED_FLAG_SPELLINGS.get(name, name)] = (
                None if value is None or value.startswith("--") else value)
    return flags


def flags_of(args: list[str]) -> dict[str, str | None]:
    flags = {}
    for index, arg in enumerate(args):
        if arg.startswith("--"):
            value = args[index + 1] if index + 1 < len(args) else None
            flags[arg] = None if value is None or value.startswith("--") else value
    return flags


def test_seed_workload_renders_every_flag_of_the_seeds_command(host_data):
    settings = read_settings(FakeHost("tray1", host_data("gb200")))
    args = bench_serve_args(settings, WORKLOADS["seed-8k-1k"], "/var/lib/vllm-bench/r1")
    seed = seed_bench_flags()
    assert len(seed) == 9  # the parse found the whole command
    ours = flags_of(args)
    assert args[:2] == ["bench", "serve"]  # after the runtime's own `vllm`: client_argv
    for flag, value in seed.items():
        # The seed ran inside the container, where the weights are /app/model.
        expected = settings.model_dir if flag == "--model" else value
        assert ours.get(flag, "missing") == expected, flag
    assert ours["--base-url"] == "http://127.0.0.1:8000"
    assert ours["--result-dir"] == "/var/lib/vllm-bench/r1"


def test_sandbox_workload_is_small_and_skips_remote_code_for_a_model_without_any(host_data):
    settings = read_settings(FakeHost("sbx1", host_data("sandbox")))
    flags = flags_of(bench_serve_args(settings, WORKLOADS["sandbox"], "/tmp/r"))
    assert (flags["--random-input-len"], flags["--random-output-len"], flags["--num-prompts"],
            flags["--request-rate"]) == ("64", "32", "16", "4")
    assert "--trust-remote-code" not in flags
    assert "--ignore-eos" in flags


def test_script_reads_the_key_on_the_host_and_never_holds_it(host_data):
    host = FakeHost("sbx1", host_data("sandbox", bench_profile="sandbox"))
    settings = read_settings(host)
    assert settings.api_key == API_KEY
    script = bench_script(settings, read_bench_settings(host.name, host.data))
    assert API_KEY not in script
    assert f"key=$(sed -n 's/^VLLM_API_KEY=//p' {ENV_FILE})" in script
    assert 'export OPENAI_API_KEY="$key"' in script
    # Every metadata value that makes runs comparable is on the client's command line.
    for item in ("host=sbx1", "runtime=venv", "model_repo=sandbox/tiny-kimi",
                 "model_revision=main", "bench_profile=sandbox",
                 f"serve_args_sha256={serve_args_digest(settings.serve_args)}",
                 '"vllm_version=$version"', '"date=$started"'):
        assert item in script, item
    # A restart while the client ran voids the result.
    assert "systemctl show -p InvocationID --value vllm.service" in script
    assert script.index("metrics-before.prom") < script.index("bench serve") \
        < script.index("metrics-after.prom")


def test_serve_args_digest_changes_with_any_flag(host_data):
    plain = read_settings(FakeHost("h", host_data("sandbox")))
    extra = read_settings(FakeHost("h", host_data("sandbox", vllm_extra_args=["--max-num-seqs", "8"])))
    assert serve_args_digest(plain.serve_args) != serve_args_digest(extra.serve_args)
    assert re.fullmatch(r"[0-9a-f]{16}", serve_args_digest(plain.serve_args))


def test_run_id_defaults_to_one_timestamp_for_every_host_of_a_run(host_data):
    first = read_bench_settings("h1", host_data("sandbox", bench_profile="sandbox"))
    second = read_bench_settings("h2", host_data("sandbox", bench_profile="sandbox"))
    assert first.run_id == second.run_id
    assert re.fullmatch(r"\d{8}T\d{6}Z-sandbox", first.run_id)
    assert first.results_dir == REPO / "results" / "bench" / first.run_id
    assert first.host_dir == f"/var/lib/vllm-bench/{first.run_id}"


def test_a_given_run_id_and_an_absolute_results_dir_are_kept(host_data, tmp_path):
    bench = read_bench_settings("h1", host_data("sandbox", bench_profile="sandbox",
                                          bench_run_id="spec-off",
                                          bench_results_dir=str(tmp_path)))
    assert isinstance(bench, BenchSettings)
    assert bench.results_dir == Path(tmp_path) / "spec-off"


@pytest.mark.parametrize("key, value, need", [
    ("bench_profile", "seed-16k", "one of ['sandbox', 'seed-8k-1k']"),
    ("bench_profile", None, "one of"),
    ("bench_run_id", "../etc", "a folder name"),
    ("bench_run_id", "a/b", "a folder name"),
    ("bench_host_dir", "var/lib", "an absolute path on the host"),
    ("bench_results_dir", "", "a folder on the controller"),
])
def test_bad_bench_data_names_host_and_key(host_data, key, value, need):
    data = host_data("sandbox", bench_profile="sandbox")
    data[key] = value
    with pytest.raises(DataError) as error:
        read_bench_settings("h1", data)
    (problem,) = error.value.problems
    assert str(problem).startswith(f"h1: {key}: found {value!r}; need ") and need in problem.need


def test_a_numeric_run_id_from_the_command_line_is_a_folder_name(host_data):
    bench = read_bench_settings("h1", host_data("sandbox", bench_profile="sandbox", bench_run_id=42))
    assert bench.run_id == "42"


# ---- the client of every runtime, planned as bench.py plans it --------------------------------

SEED_IMAGE = "vllm/vllm-openai:v0.19.1-cu130"


def fake(data: dict) -> dict:
    """Host data for pyinfra's @fake connector, standing in for hosts none of which exists
    here: an aarch64 tray (the seed's), answering at once."""
    return {**data, "fake_responses": {fact_command(CpuArchitecture): ["aarch64"]},
            "fake_delay": 0, "fake_delay_jitter": 0}


def plan_bench_py(hosts: dict[str, tuple[dict, str]]) -> dict[str, dict[str, list[str]]]:
    """{host: {operation: commands}} of bench.py, planned on @fake hosts given as
    {name: (data, inventory group)}, each host running the runbook file as the CLI would."""
    groups: dict[str, list[str]] = {}
    for name, (_, group) in hosts.items():
        groups.setdefault(group, []).append(f"@fake/{name}")
    inventory = Inventory(([(f"@fake/{name}", fake(data)) for name, (data, _) in hosts.items()],
                           {}), **{group: (names, {}) for group, names in groups.items()})
    state = State(inventory, Config())
    connect_all(state)
    add_deploy(state, runpy.run_path, str(REPO / "bench.py"))

    def describe(command) -> str:
        return command.get_raw_value() if isinstance(command, StringCommand) else \
            type(command).__name__

    return {host.name.removeprefix("@fake/"): planned_commands(state, host, describe)
            if state.ops[host] else {} for host in inventory}


def client_command(plan: dict[str, list[str]], workload: str) -> list[str]:
    """The argv of the `vllm bench serve` line of the planned benchmark script."""
    (command,) = plan[f"Benchmark the endpoint with workload {workload}"]
    script = shlex.split(command)[2]  # sh -c SCRIPT
    line = next(line for line in script.splitlines() if " bench serve " in line)
    tokens = shlex.split(line)
    return tokens[:tokens.index(">")]


def test_a_gb200_tray_runs_the_client_in_a_container_of_its_pinned_image(host_data):
    """The docker runtime (GB200's) has no venv: the client is the serving image's vLLM."""
    plans = plan_bench_py({"tray-01": (host_data("gb200", bench_run_id="r1"), "gb200")})
    argv = client_command(plans["tray-01"], "seed-8k-1k")
    image_at = argv.index(SEED_IMAGE)
    assert argv[:image_at + 3] == [
        "/usr/bin/docker", "run", "--rm", "--name", "vllm-bench", "--pull", "never",
        "--runtime", "nvidia", "--gpus", "all", "--network", "host", "--env", "OPENAI_API_KEY",
        "--env", "HF_HUB_OFFLINE=1", "--env", "TRANSFORMERS_OFFLINE=1",
        "--env", "VLLM_NO_USAGE_STATS=1", "--env", "DO_NOT_TRACK=1",
        "--volume", "/raid/models/kimi-k2.6:/raid/models/kimi-k2.6:ro",
        "--volume", "/var/lib/vllm-bench/r1:/var/lib/vllm-bench/r1",
        "--entrypoint", "vllm", SEED_IMAGE, "bench", "serve"]
    assert "vllm_image=" + SEED_IMAGE in argv  # the result says which image measured it
    every_command = "\n".join(c for commands in plans["tray-01"].values() for c in commands)
    assert "/opt/vllm/venv" not in every_command
    assert "/version" in every_command  # the server's own vLLM version, from any runtime


def test_a_venv_host_runs_the_client_from_its_venv_offline(host_data):
    plans = plan_bench_py({"sbx1": (host_data("sandbox", bench_profile="sandbox"), "sandbox")})
    argv = client_command(plans["sbx1"], "sandbox")
    assert argv[:8] == ["env", "HF_HUB_OFFLINE=1", "TRANSFORMERS_OFFLINE=1",
                        "VLLM_NO_USAGE_STATS=1", "DO_NOT_TRACK=1", "/opt/vllm/venv/bin/vllm",
                        "bench", "serve"]
    assert "docker" not in " ".join(argv)


def test_the_context_is_checked_after_health_and_before_the_benchmark(host_data):
    """pyinfra stops a host at its first failed operation: a refused workload sends nothing."""
    plans = plan_bench_py({"sbx1": (host_data("sandbox", bench_profile="sandbox"), "sandbox")})
    assert list(plans["sbx1"])[:3] == ["Wait for vLLM /health before benchmarking",
                                       "Check that workload sandbox fits the served context",
                                       "Benchmark the endpoint with workload sandbox"]


def test_control_hosts_are_not_benchmarked(host_data):
    """The gb200 inventory holds a drift-check host (and, for kubernetes, a control host):
    they serve nothing, and their data has no runtime to resolve."""
    control = {**group_data(), "drift_repo_dir": "/opt/kimi-gb200"}
    plans = plan_bench_py({"tray-01": (host_data("gb200"), "gb200"),
                           "drift-control-01": (control, "drift_control"),
                           "k8s-control-01": (control, "k8s_control")})
    assert plans["drift-control-01"] == {} and plans["k8s-control-01"] == {}
    assert "Benchmark the endpoint with workload seed-8k-1k" in plans["tray-01"]


def test_a_kubernetes_tray_is_refused_in_one_line(host_data):
    with pytest.raises(DataError) as error:
        read_bench_settings("tray-01", host_data("gb200", vllm_runtime="kubernetes"))
    (problem,) = error.value.problems
    line = str(problem)
    assert line.startswith("tray-01: vllm_runtime: found 'kubernetes'; need the docker or venv "
                           "runtime")
    assert "kubectl exec deploy/kimi-k26 -- vllm bench serve" in line


def gb200_bench_dry_run(runtime: str | None) -> subprocess.CompletedProcess:
    """The README's `pyinfra inventories/gb200.py bench.py`, planned (--dry) by pyinfra's CLI
    on those hosts as @fake hosts (harness/gb200_fake_inventory.py: no tray exists here)."""
    env = {key: value for key, value in os.environ.items()
           if key not in ("GB200_FAKE", "GB200_FAKE_RUNTIME")}
    if runtime:
        env["GB200_FAKE_RUNTIME"] = runtime
    return subprocess.run([str(Path(sys.executable).parent / "pyinfra"),
                           "harness/gb200_fake_inventory.py", "bench.py", "--dry", "-y"],
                          cwd=REPO, env=env, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=120)


def test_the_readme_command_plans_on_the_gb200_inventory():
    result = gb200_bench_dry_run(None)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for tray in ("gb200-tray-01", "gb200-tray-02"):
        assert re.search(rf"\[@fake/{tray}\]\s+Ready: bench.py", result.stderr), tray


def test_the_gb200_inventory_on_kubernetes_is_refused_in_one_line_without_a_traceback():
    result = gb200_bench_dry_run("kubernetes")
    output = result.stdout + result.stderr
    assert result.returncode == 1
    # The first tray planned (either: hosts are planned concurrently) stops the run.
    assert re.search(r"@fake/gb200-tray-0[12]: vllm_runtime: found 'kubernetes'; need the "
                     r"docker or venv runtime: bench.py benchmarks vllm.service from the host",
                     output), output[-3000:]
    assert "Traceback" not in output


def test_the_docker_client_never_holds_the_key_nor_writes_beside_the_weights(host_data):
    settings = read_settings(FakeHost("tray-01", host_data("gb200")))
    argv = client_argv(settings, "/var/lib/vllm-bench/r1", SEED_IMAGE)
    assert API_KEY not in " ".join(argv)
    # By name only: docker takes the value from the calling shell's environment.
    assert argv[argv.index("OPENAI_API_KEY") - 1] == "--env"
    assert not [arg for arg in argv if arg.startswith("OPENAI_API_KEY=")]
    assert [arg for arg in argv if arg.startswith("/raid/")] == [
        "/raid/models/kimi-k2.6:/raid/models/kimi-k2.6:ro"]


# ---- the context check, run by a real shell against a stand-in /v1/models -------------------

class ModelsEndpoint(BaseHTTPRequestHandler):
    """Stands in for vLLM's GET /v1/models (vLLM cannot run here): the body vLLM 0.32 gives
    (`ModelList`, compact JSON) with `max_model_len` (None leaves it out), or the error
    `status`; records the Authorization header it got."""

    max_model_len: int | None = 2048
    status = 200
    seen: list[str | None] = []

    def do_GET(self):  # noqa: N802 (the http.server name)
        type(self).seen.append(self.headers.get("Authorization"))
        if self.path != "/v1/models":
            self.send_error(404)
            return
        if self.status != 200:
            self.send_error(self.status)
            return
        card = {"id": "Kimi-K2.6", "object": "model", "created": 1, "owned_by": "vllm",
                "root": "/raid/models/kimi-k2.6", "parent": None,
                "permission": [{"id": "modelperm-1", "object": "model_permission"}]}
        if self.max_model_len is not None:
            card["max_model_len"] = self.max_model_len
        body = json.dumps({"object": "list", "data": [card]}, separators=(",", ":")).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def models_endpoint():
    ModelsEndpoint.seen = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), ModelsEndpoint)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def run_context_check(host_data, tmp_path, server, profile: str, max_model_len,
                      key: str | None = API_KEY, status: int = 200):
    ModelsEndpoint.max_model_len, ModelsEndpoint.status = max_model_len, status
    env_file = tmp_path / "vllm.env"
    env_file.write_text(env_file_content(key))  # what the deploy writes to ENV_FILE
    data = host_data("sandbox", bench_profile=profile, vllm_port=server.server_port)
    settings = read_settings(FakeHost("sbx1", data))
    script = context_check_script(settings, read_bench_settings("sbx1", data), str(env_file))
    assert API_KEY not in script
    return subprocess.run(["sh", "-c", script], capture_output=True, text=True, timeout=60)


def test_the_seed_workload_is_refused_by_a_2048_token_server_naming_the_lengths(
        host_data, tmp_path, models_endpoint):
    result = run_context_check(host_data, tmp_path, models_endpoint, "seed-8k-1k", 2048)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        "sbx1: bench_profile: found 'seed-8k-1k', 8000 input + 1024 output = 9024 tokens per "
        "request; need at most the served model's max_model_len of 2048 (GET /v1/models): "
        "pick a bench_profile that fits (tasks/bench.py), or serve a longer context"]
    # The key went as a header, read on the host from the env file.
    assert ModelsEndpoint.seen == [f"Bearer {API_KEY}"]


@pytest.mark.parametrize("profile, max_model_len, code", [
    ("sandbox", 2048, 0),
    ("sandbox", 96, 0),  # 64 in + 32 out: exactly the context
    ("sandbox", 95, 1),
    ("seed-8k-1k", 262144, 0),  # Kimi-K2.6's context
])
def test_a_workload_passes_exactly_when_it_fits(host_data, tmp_path, models_endpoint,
                                                profile, max_model_len, code):
    result = run_context_check(host_data, tmp_path, models_endpoint, profile, max_model_len)
    assert result.returncode == code, result.stderr
    if code == 0:
        assert f"fit max_model_len {max_model_len}" in result.stdout


def test_an_open_endpoint_gets_no_authorization_header(host_data, tmp_path, models_endpoint):
    result = run_context_check(host_data, tmp_path, models_endpoint, "sandbox", 2048, key=None)
    assert result.returncode == 0, result.stderr
    assert ModelsEndpoint.seen == [None]


@pytest.mark.parametrize("status, said", [
    (200, "named no max_model_len: cannot tell whether bench_profile 'sandbox' fits"),
    (401, "/v1/models failed: cannot tell whether bench_profile 'sandbox' fits"),
])
def test_a_server_that_does_not_say_its_context_refuses_the_run(host_data, tmp_path,
                                                                models_endpoint, status, said):
    result = run_context_check(host_data, tmp_path, models_endpoint, "sandbox", None,
                               status=status)
    assert result.returncode == 1
    assert f"sbx1: GET http://127.0.0.1:{models_endpoint.server_port}" in result.stderr
    assert said in result.stderr


# ---- the result check, run by a real shell on what vLLM's client leaves ---------------------

# What `vllm bench serve` (vLLM 0.32, vllm/benchmarks/serve.py) prints when requests fail.
FAILED_LOG = """Starting initial single prompt test run...
Skipping endpoint ready check.
Starting main benchmark run...
Traffic request rate: 4.0
Failed requests during benchmark run detected (capping to 10):
Error 0: Bad Request
Error 1: Bad Request
============ Serving Benchmark Result ============
Successful requests:                     0
Failed requests:                         16
"""


def vllm_result(completed: int, failed: int) -> str:
    """A result JSON as vLLM writes it (`json.dump`, default separators), with our metadata."""
    return json.dumps({"date": "20260101-000000", "backend": "openai-chat", "num_prompts": 16,
                       "request_rate": 4.0, "host": "sbx1", "bench_profile": "sandbox",
                       "duration": 4.2, "completed": completed, "failed": failed,
                       "total_input_tokens": 64 * completed, "output_throughput": 0.0})


def run_result_check(host_data, tmp_path, result: str | None, log: str):
    data = host_data("sandbox", bench_profile="sandbox", bench_run_id="r1",
                     bench_host_dir=str(tmp_path))
    bench = read_bench_settings("sbx1", data)
    Path(bench.host_dir).mkdir(parents=True)
    if result is not None:
        (Path(bench.host_dir) / "result.json").write_text(result)
    (Path(bench.host_dir) / "bench.log").write_text(log)
    script = "\n".join(["set -eu", *result_check(read_settings(FakeHost("sbx1", data)), bench)])
    return subprocess.run(["sh", "-c", script], capture_output=True, text=True, timeout=60)


def test_failed_requests_fail_the_run_printing_the_first_server_error(host_data, tmp_path):
    result = run_result_check(host_data, tmp_path, vllm_result(0, 16), FAILED_LOG)
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert lines[0] == (
        "sbx1: vllm bench serve: 16 of 16 requests failed (bench_profile sandbox), the result "
        f"is void; the first error the server gave (whole log: {tmp_path}/r1/bench.log on "
        "sbx1):")
    assert lines[1:] == ["Error 0: Bad Request"]


def test_one_failed_request_is_enough(host_data, tmp_path):
    result = run_result_check(host_data, tmp_path, vllm_result(15, 1), FAILED_LOG)
    assert result.returncode == 1
    assert "1 of 16 requests failed" in result.stderr


def test_a_multi_line_error_is_printed_whole_up_to_the_next(host_data, tmp_path):
    traceback = ("Error 0: Traceback (most recent call last):\n  File \"x.py\", line 1\n"
                 "aiohttp.client_exceptions.ServerDisconnectedError: Server disconnected\n")
    log = FAILED_LOG.replace("Error 0: Bad Request\n", traceback)
    result = run_result_check(host_data, tmp_path, vllm_result(0, 16), log)
    assert result.stderr.splitlines()[1:] == traceback.splitlines()


def test_a_log_of_another_format_shows_its_tail(host_data, tmp_path):
    result = run_result_check(host_data, tmp_path, vllm_result(0, 16), "line 1\nlast words\n")
    assert result.returncode == 1
    assert result.stderr.splitlines()[1:] == ["line 1", "last words"]


def test_a_clean_run_passes_and_a_missing_result_fails(host_data, tmp_path):
    clean = run_result_check(host_data, tmp_path, vllm_result(16, 0), "all good\n")
    assert (clean.returncode, clean.stderr) == (0, "")
    missing = run_result_check(host_data, tmp_path / "other", None, "Traceback: boom\n")
    assert missing.returncode == 1
    assert "sbx1: vllm bench serve wrote no " in missing.stderr
    assert "Traceback: boom" in missing.stderr
