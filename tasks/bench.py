"""Benchmarks: `vllm bench serve` on each host against its own endpoint, results brought home.

A workload profile names what the seed measured (or a small sandbox variant). The client runs
on the host, beside vllm.service, from the vLLM the server runs: the venv runtime's venv, or a
throwaway container of the docker runtime's pinned image. So the client matches the server's
version and no network sits between them. The API key reaches it through the environment,
read on the host from the root-only secrets file, never through a command line.

Before any request, a workload that cannot fit the served model's context (`max_model_len`
of `/v1/models`) is refused; after the run, any failed request fails the host, printing the
first error the server gave. Each run leaves, per host, `<bench_results_dir>/<run id>/<host>.json`
(vLLM's result JSON plus our metadata), the server's `/metrics` before and after
(speculative-decoding counters) and the client's log.
"""

from __future__ import annotations

import hashlib
import json
import shlex
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from pyinfra import host
from pyinfra.api import deploy
from pyinfra.operations import files, python, server

from tasks import data_keys
from tasks.data_keys import DataError, problem
from tasks.facts import CpuArchitecture
from tasks.operations import service_healthy
from tasks.settings import ENV_FILE, OFFLINE_ENVIRONMENT, REPO, UNIT_NAME, Settings, read_settings
from tasks.tls import CA_FILE, TLS_DIR
from tasks.vllm_container import DOCKER, GPU_ARGS, image_reference


@dataclass(frozen=True)
class Workload:
    """One `vllm bench serve` workload on vLLM's random dataset."""

    name: str  # the value of `bench_profile`
    input_len: int  # prompt tokens per request
    output_len: int  # tokens generated per request (--ignore-eos makes it exact)
    num_prompts: int
    request_rate: float  # requests per second, Poisson arrivals
    timeout_s: int  # the whole client run: vLLM import, tokenizer load, load
    ignore_eos: bool = True

    @property
    def context_len(self) -> int:
        """Tokens one request holds at its end: what the served context must fit."""
        return self.input_len + self.output_len


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
# Names of what each host's run leaves, on the host and (prefixed by the host) at home.
RESULT_FILES = {"result.json": ".json", "metrics-before.prom": ".metrics-before.prom",
                "metrics-after.prom": ".metrics-after.prom", "bench.log": ".log"}
# The bench client reads a local tokenizer: hosts may be offline, and nothing should phone home.
CLIENT_ENVIRONMENT = OFFLINE_ENVIRONMENT
# docker runtime: the client's throwaway container. A fixed name makes a second benchmark on
# the host while one still runs fail on the name, rather than measure a shared server.
BENCH_CONTAINER = "vllm-bench"
# Lines of the first failed request's error printed when requests failed (a traceback can be
# long; the whole log stays on the host).
ERROR_LINES = 20


@dataclass(frozen=True)
class BenchSettings:
    workload: Workload
    run_id: str
    results_dir: Path  # controller: this run's folder
    host_dir: str  # host: this run's folder


def read_bench_settings(host_name: str, data) -> BenchSettings:
    """The bench_* keys, checked (tasks/data_keys.py), and the runtime's rule: a pod serves
    on the kubernetes runtime, not vllm.service. DataError holds every problem."""
    values = data_keys.read(host_name, data)
    if values["vllm_runtime"] == "kubernetes":
        # The trays of this runtime hold the weights only: no vllm.service, no vLLM to run.
        raise DataError([problem(
            host_name, "vllm_runtime", "kubernetes", "the docker or venv runtime: bench.py "
            "benchmarks vllm.service from the host, and on this runtime a pod serves; or run "
            f"the client in the pod: kubectl exec deploy/{values['k8s_name']} -- vllm bench "
            "serve ...")])
    workload = WORKLOADS[values["bench_profile"]]
    # pyinfra's --data turns `bench_run_id=42` into a number.
    run_id = (str(values["bench_run_id"]) if values["bench_run_id"] is not None
              else f"{RUN_STARTED:%Y%m%dT%H%M%SZ}-{workload.name}")
    # Relative to this repository, as every controller path in data, not to the caller's cwd.
    return BenchSettings(workload=workload, run_id=run_id,
                         results_dir=REPO / values["bench_results_dir"] / run_id,
                         host_dir=f"{values['bench_host_dir'].rstrip('/')}/{run_id}")


def serve_args_digest(serve_args: list[str]) -> str:
    """Names the exact server command line a result was measured against."""
    return hashlib.sha256(json.dumps(serve_args).encode()).hexdigest()[:16]


def local_curl(settings: Settings) -> str:
    """curl on the host for vLLM's local_url (trusting its CA over TLS), 30 s at most."""
    return " ".join(["curl", "-fsS", "--max-time", "30", *settings.local_curl_options])


def client_argv(settings: Settings, result_dir: str, image: str | None) -> list[str]:
    """The command that is vLLM's CLI for the client on this host, with CLIENT_ENVIRONMENT.

    venv runtime: the venv's `vllm`. docker runtime: a throwaway container of the image
    vllm.service runs (`image`), rather than `docker exec` into the serving container: the
    client is the server's vLLM all the same, while the serving container gets no process,
    file or mount it was not started with. `--network host` reaches the published port on
    127.0.0.1 as a venv client does; the weights (for the tokenizer) are mounted read-only at
    their host paths as the server sees them, the results folder read-write. The GPUs are
    handed over as to the server: the seed's client ran with them visible, inside the serving
    container beside a server holding 0.90 of their memory, while a CUDA build's `vllm bench
    serve` without them has failed on platform detection (vLLM issue 23967). `--entrypoint vllm`:
    vllm/vllm-openai's entrypoint is `vllm serve`, vllm-image's is unset with vllm on
    PATH. `--env OPENAI_API_KEY` names the variable only: docker copies its value from the
    calling shell's environment, so no argv holds the key.
    """
    environment = dict(CLIENT_ENVIRONMENT)
    ca = f"{TLS_DIR}/{CA_FILE}"
    if settings.tls is not None:
        environment["SSL_CERT_FILE"] = ca  # the client (aiohttp) trusts vLLM's CA
    if settings.runtime == "venv":
        return ["env", *(f"{key}={value}" for key, value in environment.items()),
                f"{settings.venv_dir}/bin/vllm"]
    argv = [DOCKER, "run", "--rm", "--name", BENCH_CONTAINER, "--pull", "never",
            *GPU_ARGS[settings.container_gpus], "--network", "host", "--env", "OPENAI_API_KEY"]
    for key, value in environment.items():
        argv += ["--env", f"{key}={value}"]
    if settings.tls is not None:  # the CA alone: never the folder that holds the key
        argv += ["--volume", f"{ca}:{ca}:ro"]
    return argv + ["--volume", f"{settings.model_dir}:{settings.model_dir}:ro",
                   "--volume", f"{result_dir}:{result_dir}", "--entrypoint", "vllm", image]


def bench_serve_args(settings: Settings, workload: Workload, result_dir: str) -> list[str]:
    """The `vllm bench serve` arguments after the program: where the endpoint is, the seed's
    flags (section 6.1) in the seed's order, then where the result goes. `bench_script` adds
    the metadata."""
    args = ["bench", "serve",
            "--backend", "openai-chat", "--endpoint", "/v1/chat/completions",
            "--base-url", settings.local_url,
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


def bench_metadata(settings: Settings, bench: BenchSettings,
                   image: str | None = None) -> dict[str, str]:
    """What a result needs to be compared fairly later; the server's vLLM version and the
    date are added on the host, at run time."""
    metadata = {
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
    if image is not None:
        metadata["vllm_image"] = image
    return metadata


def _format(text: str) -> str:
    """``text`` as a literal part of a printf format."""
    return text.replace("%", "%%")


def api_key_exported(env_file: str = ENV_FILE) -> list[str]:
    """Shell lines that export the server's key as OPENAI_API_KEY (what vLLM's client sends as
    a bearer token) from the root-only env file, by shell built-ins and sed's output only, so
    no process's arguments ever hold it; nothing is exported for an open endpoint."""
    return [f"key=$(sed -n 's/^VLLM_API_KEY=//p' {shlex.quote(env_file)})",
            'if [ -n "$key" ]; then export OPENAI_API_KEY="$key"; fi',
            "unset key"]


def context_check_script(settings: Settings, bench: BenchSettings,
                         env_file: str = ENV_FILE) -> str:
    """The host-side script that refuses, before any request, a workload whose requests
    cannot fit the served model's context: every one would fail (vLLM answers 400).

    `/v1/models` gives `max_model_len` (the same for every model card of a server); the key
    goes to curl as a header read from stdin (`-H @-`, printed by the printf built-in). The
    chat template adds a few tokens to each prompt: a workload within a few tokens of the
    limit passes here and its requests fail, which the benchmark's own check reports.
    """
    workload = bench.workload
    url = f"{settings.local_url}/v1/models"
    curl = local_curl(settings)
    too_long = _format(
        f"{settings.host_name}: bench_profile: found '{workload.name}', {workload.input_len} "
        f"input + {workload.output_len} output = {workload.context_len} tokens per request; "
        "need at most the served model's max_model_len of ") + "%s" + _format(
        " (GET /v1/models): pick a bench_profile that fits (tasks/bench.py), or serve a "
        "longer context") + "\\n"
    unknown = (f"{settings.host_name}: GET {url} named no max_model_len: cannot tell whether "
               f"bench_profile '{workload.name}' fits the served context")
    unanswered = (f"{settings.host_name}: GET {url} failed: cannot tell whether bench_profile "
                  f"'{workload.name}' fits the served context")
    return "\n".join([
        "set -eu",
        *api_key_exported(env_file),
        'models=$(if [ -n "${OPENAI_API_KEY:-}" ]; then '
        "printf 'Authorization: Bearer %s\\n' \"$OPENAI_API_KEY\"; fi "
        f"| {curl} -H @- {url}) "
        f"|| {{ echo {shlex.quote(unanswered)} >&2; exit 1; }}",
        "max_len=$(printf '%s' \"$models\" | grep -o '\"max_model_len\": *[0-9][0-9]*' "
        "| grep -o '[0-9][0-9]*$' | sort -n | head -n 1)",
        f'[ -n "$max_len" ] || {{ echo {shlex.quote(unknown)} >&2; exit 1; }}',
        f'if [ "$max_len" -lt {workload.context_len} ]; then '
        f'printf {shlex.quote(too_long)} "$max_len" >&2; exit 1; fi',
        f"echo 'bench_profile {workload.name}: {workload.context_len} tokens per request fit "
        "max_model_len '\"$max_len\"",
    ])


def result_check(settings: Settings, bench: BenchSettings) -> list[str]:
    """Shell lines that fail the host when the client's result is missing or counts any
    failed request, printing the first error the server gave (vLLM's client logs each as
    `Error N: ...`; without --save-detailed the result JSON keeps no errors)."""
    q = shlex.quote
    result, log = f"{bench.host_dir}/result.json", f"{bench.host_dir}/bench.log"
    name, workload = settings.host_name, bench.workload
    failed = _format(f"{name}: vllm bench serve: ") + "%s" + _format(
        f" of {workload.num_prompts} requests failed (bench_profile {workload.name}), the "
        f"result is void; the first error the server gave (whole log: {log} on {name}):") + "\\n"
    first_error = (f"awk '/^Error 0: /{{on=1}} on && /^(Error 1: |=====)/{{exit}} on' {q(log)} "
                   f"| head -n {ERROR_LINES}")
    return [
        f"[ -s {q(result)} ] || {{ echo {q(f'{name}: vllm bench serve wrote no {result}')} "
        f">&2; tail -n 40 {q(log)} >&2; exit 1; }}",
        f"failed=$(grep -o '\"failed\": *[0-9][0-9]*' {q(result)} | grep -o '[0-9][0-9]*$' "
        "| head -n 1)",
        'if [ "${failed:-unknown}" != 0 ]; then',
        f'  printf {q(failed)} "${{failed:-an unknown number}}" >&2',
        f"  first=$({first_error})",
        f'  [ -n "$first" ] || first=$(tail -n {ERROR_LINES} {q(log)})',
        "  printf '%s\\n' \"$first\" >&2; exit 1",
        "fi",
    ]


def bench_script(settings: Settings, bench: BenchSettings, image: str | None = None) -> str:
    """The host-side shell script: scrape /metrics, run the client, scrape again, check.

    The key reaches the client's environment by `api_key_exported`. The server's vLLM version
    comes from its unauthenticated /version. A stop or restart of the service during the run,
    or any failed request, voids the result.
    """
    q = shlex.quote
    out = bench.host_dir
    base_url = settings.local_url
    curl = local_curl(settings)
    metadata = [q(f"{key}={value}") for key, value in
                bench_metadata(settings, bench, image).items()]
    metadata += ['"vllm_version=$version"', '"date=$started"']
    client = " ".join(q(arg) for arg in client_argv(settings, out, image)
                      + bench_serve_args(settings, bench.workload, out))
    return "\n".join([
        "set -eu",
        f"invocation=$(systemctl show -p InvocationID --value {UNIT_NAME})",
        f"systemctl is-active --quiet {UNIT_NAME} "
        f"|| {{ echo '{UNIT_NAME} is not active: no benchmark' >&2; exit 1; }}",
        f"rm -rf {q(out)} && mkdir -p {q(out)}",
        *api_key_exported(),
        f"version=$({curl} {base_url}/version "
        "| sed -n 's/.*\"version\": *\"\\([^\"]*\\)\".*/\\1/p')",
        'version=${version:-unknown}',
        "started=$(date -u +%Y-%m-%dT%H:%M:%SZ)",
        f"{curl} -o {q(out + '/metrics-before.prom')} {base_url}/metrics",
        f"{client} --metadata {' '.join(metadata)} "
        f"> {q(out + '/bench.log')} 2>&1 "
        f"|| {{ tail -n 40 {q(out + '/bench.log')} >&2; exit 1; }}",
        "scraped=yes",
        f"{curl} -o {q(out + '/metrics-after.prom')} {base_url}/metrics "
        "|| scraped=no",
        # A stop waits for requests in flight: the unit may still be deactivating here.
        f'if [ "$(systemctl show -p InvocationID --value {UNIT_NAME})" != "$invocation" ] '
        f"|| ! systemctl is-active --quiet {UNIT_NAME}; then",
        f"  echo '{UNIT_NAME} stopped or restarted during the benchmark: result discarded' >&2",
        f"  rm -f {q(out + '/result.json')}; exit 1",
        "fi",
        '[ "$scraped" = yes ] || { echo "/metrics did not answer after the benchmark" >&2; '
        "exit 1; }",
        *result_check(settings, bench),
    ])


@deploy("Benchmark")
def run() -> None:
    """Benchmark each host's own vLLM endpoint with `vllm bench serve` once /health answers
    and the workload fits the served context, and bring the results home to
    `<bench_results_dir>/<run id>/<host>.*`; any failed request fails the host.

    Data keys: bench_profile, bench_run_id, bench_results_dir, bench_host_dir; and those that
    locate the endpoint and the client (vllm_runtime, vllm_port, vllm_venv_dir, vllm_image,
    vllm_api_key_file, model_*).
    """
    settings = read_settings(host)
    bench = read_bench_settings(host.name, host.data)
    image = (image_reference(settings, host.get_fact(CpuArchitecture))
             if settings.runtime == "docker" else None)
    # Never measure a server that is still (re)starting: wait as long as a deploy would.
    service_healthy(name="Wait for vLLM /health before benchmarking", url=settings.health_url,
                    curl_options=settings.local_curl_options,
                    timeout_s=settings.health_timeout_s, unit=UNIT_NAME)
    server.shell(name=f"Check that workload {bench.workload.name} fits the served context",
                 commands=[f"sh -c {shlex.quote(context_check_script(settings, bench))}"])
    server.shell(name=f"Benchmark the endpoint with workload {bench.workload.name}",
                 commands=[f"sh -c {shlex.quote(bench_script(settings, bench, image))}"],
                 _timeout=bench.workload.timeout_s)
    # At run time, not while planning: a --dry run leaves no empty run folder behind.
    python.call(name="Create the run's folder on the controller",
                function=bench.results_dir.mkdir, parents=True, exist_ok=True)
    for remote_name, suffix in RESULT_FILES.items():
        files.get(name=f"Bring {remote_name} home",
                  src=f"{bench.host_dir}/{remote_name}",
                  dest=str(bench.results_dir / f"{host.name}{suffix}"), add_deploy_dir=False)
