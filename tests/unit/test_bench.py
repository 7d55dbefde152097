"""tasks/bench.py: the `vllm bench serve` command is the seed's (section 6.1), flag by flag; the
host-side script keeps the API key out of every command line; bench data is validated."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from tasks.bench import (WORKLOADS, BenchSettings, bench_script, bench_serve_args,
                         resolve_bench, serve_args_digest)
from tasks.settings import ENV_FILE, DataError, resolve
from tests.helpers import REPO, FakeHost, group_data, seed_benchmarks_text

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
    settings = resolve(FakeHost("tray1", host_data("gb200")))
    args = bench_serve_args(settings, WORKLOADS["seed-8k-1k"], "/var/lib/vllm-bench/r1")
    seed = seed_bench_flags()
    assert len(seed) == 9  # the parse found the whole command
    ours = flags_of(args)
    assert args[:3] == ["/opt/vllm/venv/bin/vllm", "bench", "serve"]
    for flag, value in seed.items():
        # The seed ran inside the container, where the weights are /app/model.
        expected = settings.model_dir if flag == "--model" else value
        assert ours.get(flag, "missing") == expected, flag
    assert ours["--base-url"] == "http://127.0.0.1:8000"
    assert ours["--result-dir"] == "/var/lib/vllm-bench/r1"


def test_sandbox_workload_is_small_and_skips_remote_code_for_a_model_without_any(host_data):
    settings = resolve(FakeHost("sbx1", host_data("sandbox")))
    flags = flags_of(bench_serve_args(settings, WORKLOADS["sandbox"], "/tmp/r"))
    assert (flags["--random-input-len"], flags["--random-output-len"], flags["--num-prompts"],
            flags["--request-rate"]) == ("64", "32", "16", "4")
    assert "--trust-remote-code" not in flags
    assert "--ignore-eos" in flags


def test_script_reads_the_key_on_the_host_and_never_holds_it(host_data):
    host = FakeHost("sbx1", host_data("sandbox", bench_profile="sandbox"))
    settings = resolve(host)
    assert settings.api_key == API_KEY
    script = bench_script(settings, resolve_bench(host.name, host.data))
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
    plain = resolve(FakeHost("h", host_data("sandbox")))
    extra = resolve(FakeHost("h", host_data("sandbox", vllm_extra_args=["--max-num-seqs", "8"])))
    assert serve_args_digest(plain.serve_args) != serve_args_digest(extra.serve_args)
    assert re.fullmatch(r"[0-9a-f]{16}", serve_args_digest(plain.serve_args))


def test_run_id_defaults_to_one_timestamp_for_every_host_of_a_run(host_data):
    first = resolve_bench("h1", host_data("sandbox", bench_profile="sandbox"))
    second = resolve_bench("h2", host_data("sandbox", bench_profile="sandbox"))
    assert first.run_id == second.run_id
    assert re.fullmatch(r"\d{8}T\d{6}Z-sandbox", first.run_id)
    assert first.results_dir == REPO / "results" / "bench" / first.run_id
    assert first.host_dir == f"/var/lib/vllm-bench/{first.run_id}"


def test_a_given_run_id_and_an_absolute_results_dir_are_kept(host_data, tmp_path):
    bench = resolve_bench("h1", host_data("sandbox", bench_profile="sandbox",
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
        resolve_bench("h1", data)
    assert f"h1: {key} = {value!r}: {need}" in str(error.value)


def test_a_numeric_run_id_from_the_command_line_is_a_folder_name(host_data):
    bench = resolve_bench("h1", host_data("sandbox", bench_profile="sandbox", bench_run_id=42))
    assert bench.run_id == "42"
