"""Benchmarks: `vllm bench serve` on each host against its own endpoint, results brought home.

A workload profile names what the seed measured (or a small sandbox variant). The command runs
on the host from the host's own vLLM venv, so the client matches the server's version and no
network sits between them; the API key reaches it through the environment, read on the host
from the root-only secrets file, never through a command line. Each run leaves, per host,
`<bench_results_dir>/<run id>/<host>.json` (vLLM's result JSON plus our metadata), the
server's `/metrics` before and after (speculative-decoding counters) and the client's log.
"""

from __future__ import annotations

import hashlib
import json
import re
import shlex
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from pyinfra import host
from pyinfra.api import deploy
from pyinfra.operations import files, python, server

from tasks.operations import http_health_waited
from tasks.settings import (ENV_FILE, OFFLINE_ENVIRONMENT, REPO, UNIT_NAME, DataError, Settings,
                            resolve)


@dataclass(frozen=True)
class Workload:
    """One `vllm bench serve` workload on vLLM's random dataset."""

    name: str  # the value of `bench_profile`
    input_len: int  # prompt tokens per request
    output_len: int  # tokens generated per request (--ignore-eos makes it exact)
    num_prompts: int
    request_rate: float  # requests per second, Poisson arrivals
    timeout_s: int  # the whole client run: vLLM import, tokenizer load, test request, load
    ignore_eos: bool = True


WORKLOADS: dict[str, Workload] = {
    workload.name: workload
    for workload in (
        # The seed, section 6.1: prompt-heavy, 8k in / 1k out, 32 prompts at 10 req/s.
        # ~30 s of traffic on the seed's tray; the rest is loading Kimi's tokenizer and slack.
        Workload(name="seed-8k-1k", input_len=8000, output_len=1024, num_prompts=32,
                 request_rate=10, timeout_s=900),
        # The sandbox: the tiny model on a shared 2-core CPU answers this in ~10-20 s.
        Workload(name="sandbox", input_len=64, output_len=32, num_prompts=16,
                 request_rate=4, timeout_s=600),
    )
}

# Shared by every host of one pyinfra run (this module is imported once per run), so a run's
# results land in one folder.
RUN_STARTED = datetime.now(timezone.utc)
_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
# Names of what each host's run leaves, on the host and (prefixed by the host) at home.
RESULT_FILES = {"result.json": ".json", "metrics-before.prom": ".metrics-before.prom",
                "metrics-after.prom": ".metrics-after.prom", "bench.log": ".log"}
# The bench client reads a local tokenizer: hosts may be offline, and nothing should phone home.
CLIENT_ENVIRONMENT = OFFLINE_ENVIRONMENT


@dataclass(frozen=True)
class BenchSettings:
    workload: Workload
    run_id: str
    results_dir: Path  # controller: this run's folder
    host_dir: str  # host: this run's folder


def resolve_bench(host_name: str, data) -> BenchSettings:
    """Validate the bench_* keys; a bad value raises DataError naming host and key."""
    errors = []
    profile = data.get("bench_profile")
    workload = WORKLOADS.get(profile) if isinstance(profile, str) else None
    if workload is None:
        errors.append(f"{host_name}: bench_profile = {profile!r}: one of {sorted(WORKLOADS)} "
                      "(tasks/bench.py)")
    run_id = data.get("bench_run_id")
    if isinstance(run_id, int) and not isinstance(run_id, bool):
        run_id = str(run_id)  # pyinfra's --data turns `bench_run_id=42` into a number
    if run_id is not None and not (isinstance(run_id, str) and _RUN_ID.fullmatch(run_id)):
        errors.append(f"{host_name}: bench_run_id = {run_id!r}: a folder name of letters, "
                      "digits, '.', '_' and '-', or None for a timestamp")
    results_dir = data.get("bench_results_dir")
    if not isinstance(results_dir, str) or not results_dir:
        errors.append(f"{host_name}: bench_results_dir = {results_dir!r}: a folder on the "
                      "controller")
    host_dir = data.get("bench_host_dir")
    if not isinstance(host_dir, str) or not host_dir.startswith("/"):
        errors.append(f"{host_name}: bench_host_dir = {host_dir!r}: an absolute path on the host")
    if errors:
        raise DataError("invalid host data:\n  " + "\n  ".join(errors))
    run_id = run_id or f"{RUN_STARTED:%Y%m%dT%H%M%SZ}-{workload.name}"
    # Relative to this repository, as every controller path in data, not to the caller's cwd.
    return BenchSettings(workload=workload, run_id=run_id,
                         results_dir=REPO / results_dir / run_id,
                         host_dir=f"{host_dir.rstrip('/')}/{run_id}")


def serve_args_digest(serve_args: list[str]) -> str:
    """Names the exact server command line a result was measured against."""
    return hashlib.sha256(json.dumps(serve_args).encode()).hexdigest()[:16]


def bench_serve_args(settings: Settings, workload: Workload, result_dir: str) -> list[str]:
    """The `vllm bench serve` argument list: where the endpoint is, the seed's flags (section
    6.1) in the seed's order, then where the result goes. `bench_script` adds the metadata."""
    args = [f"{settings.venv_dir}/bin/vllm", "bench", "serve",
            "--backend", "openai-chat", "--endpoint", "/v1/chat/completions",
            "--base-url", f"http://127.0.0.1:{settings.port}",
            "--model", settings.model_dir,
            "--served-model-name", settings.profile.served_name,
            "--dataset-name", "random",
            "--random-input-len", str(workload.input_len),
            "--random-output-len", str(workload.output_len),
            "--request-rate", f"{workload.request_rate:g}",
            "--num-prompts", str(workload.num_prompts)]
    # The seed passed it for Kimi's tokenizer; a model that ships no code does not need it.
    if settings.profile.trust_remote_code:
        args.append("--trust-remote-code")
    if workload.ignore_eos:
        args.append("--ignore-eos")
    return args + ["--disable-tqdm", "--save-result", "--result-dir", result_dir,
                   "--result-filename", "result.json"]


def bench_metadata(settings: Settings, bench: BenchSettings) -> dict[str, str]:
    """What a result needs to be compared fairly later; vLLM's version and the date are
    added on the host, at run time."""
    return {
        "host": settings.host_name,
        "runtime": settings.runtime,
        "model_profile": settings.profile.name,
        "model_repo": settings.profile.repo,
        "model_revision": settings.model_revision,
        "speculative": "true" if settings.speculative else "false",
        "draft_repo": settings.draft_repo if settings.speculative else "none",
        "tensor_parallel_size": str(settings.tensor_parallel_size),
        "serve_args_sha256": serve_args_digest(settings.serve_args),
        "bench_profile": bench.workload.name,
        "run_id": bench.run_id,
    }


def bench_script(settings: Settings, bench: BenchSettings) -> str:
    """The host-side shell script: scrape /metrics, run the client, scrape again.

    The key is read from the secrets file into the client's environment (vLLM's client sends
    OPENAI_API_KEY as a bearer token) by shell built-ins only, so no process's arguments ever
    hold it. A stop or restart of the service during the run voids the result.
    """
    q = shlex.quote
    out = bench.host_dir
    metrics_url = f"http://127.0.0.1:{settings.port}/metrics"
    version = (f"{settings.venv_dir}/bin/python -c "
               + q("import importlib.metadata as m; print(m.version('vllm'))"))
    metadata = [q(f"{key}={value}") for key, value in bench_metadata(settings, bench).items()]
    metadata += ['"vllm_version=$version"', '"date=$started"']
    client = " ".join(q(arg) for arg in bench_serve_args(settings, bench.workload, out))
    environment = " ".join(f"{key}={value}" for key, value in CLIENT_ENVIRONMENT.items())
    return "\n".join([
        "set -eu",
        f"invocation=$(systemctl show -p InvocationID --value {UNIT_NAME})",
        f"systemctl is-active --quiet {UNIT_NAME} "
        f"|| {{ echo '{UNIT_NAME} is not active: no benchmark' >&2; exit 1; }}",
        f"rm -rf {q(out)} && mkdir -p {q(out)}",
        f"key=$(sed -n 's/^VLLM_API_KEY=//p' {q(ENV_FILE)})",
        'if [ -n "$key" ]; then export OPENAI_API_KEY="$key"; fi',
        "unset key",
        f"version=$({version})",
        "started=$(date -u +%Y-%m-%dT%H:%M:%SZ)",
        f"curl -fsS --max-time 30 -o {q(out + '/metrics-before.prom')} {metrics_url}",
        f"env {environment} {client} --metadata {' '.join(metadata)} "
        f"> {q(out + '/bench.log')} 2>&1 "
        f"|| {{ tail -n 40 {q(out + '/bench.log')} >&2; exit 1; }}",
        "scraped=yes",
        f"curl -fsS --max-time 30 -o {q(out + '/metrics-after.prom')} {metrics_url} "
        "|| scraped=no",
        # A stop waits for requests in flight: the unit may still be deactivating here.
        f'if [ "$(systemctl show -p InvocationID --value {UNIT_NAME})" != "$invocation" ] '
        f"|| ! systemctl is-active --quiet {UNIT_NAME}; then",
        f"  echo '{UNIT_NAME} stopped or restarted during the benchmark: result discarded' >&2",
        f"  rm -f {q(out + '/result.json')}; exit 1",
        "fi",
        '[ "$scraped" = yes ] || { echo "/metrics did not answer after the benchmark" >&2; '
        "exit 1; }",
    ])


@deploy("Benchmark")
def run() -> None:
    """Benchmark each host's own vLLM endpoint with `vllm bench serve` once /health answers,
    and bring the results home to `<bench_results_dir>/<run id>/<host>.*`.

    Data keys: bench_profile, bench_run_id, bench_results_dir, bench_host_dir; and those that
    locate the endpoint (vllm_port, vllm_venv_dir, vllm_api_key_file, model_*).
    """
    settings = resolve(host)
    bench = resolve_bench(host.name, host.data)
    # Never measure a server that is still (re)starting: wait as long as a deploy would.
    http_health_waited(name="Wait for vLLM /health before benchmarking", url=settings.health_url,
                       timeout_s=settings.health_timeout_s, unit=UNIT_NAME)
    server.shell(name=f"Benchmark the endpoint with workload {bench.workload.name}",
                 commands=[f"sh -c {shlex.quote(bench_script(settings, bench))}"],
                 _timeout=bench.workload.timeout_s)
    # At run time, not while planning: a --dry run leaves no empty run folder behind.
    python.call(name="Create the run's folder on the controller",
                function=bench.results_dir.mkdir, parents=True, exist_ok=True)
    for remote_name, suffix in RESULT_FILES.items():
        files.get(name=f"Bring {remote_name} home",
                  src=f"{bench.host_dir}/{remote_name}",
                  dest=str(bench.results_dir / f"{host.name}{suffix}"), add_deploy_dir=False)
