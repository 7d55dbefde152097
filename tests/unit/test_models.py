"""tasks/models.py: the catalog and the one `vllm serve` renderer, pinned to the seed."""

import json
import shlex

import pytest

from tasks.models import PROFILES, systemd_exec_line, vllm_serve_args
from tests.helpers import REPO, SEED, group_data

SEED_COMMAND = REPO / "tests" / "fixtures" / "seed-vllm-serve.sh"


def seed_argv() -> list[str]:
    lines = [line for line in SEED_COMMAND.read_text().splitlines() if not line.startswith("#")]
    argv = shlex.split(" ".join(line.rstrip("\\") for line in lines))
    assert argv[0] == "vllm"
    return argv[1:]


def render_gb200(draft_path):
    data = group_data("gb200")
    return vllm_serve_args(
        PROFILES[data["model_profile"]], model_path="/app/model", draft_path=draft_path,
        host=data["vllm_host"], port=data["vllm_port"],
        tensor_parallel_size=data["vllm_tensor_parallel_size"],
        gpu_memory_utilization=data["vllm_gpu_memory_utilization"],
        num_speculative_tokens=data["model_num_speculative_tokens"],
        extra_args=data["vllm_extra_args"])


def test_fixture_is_the_seeds_command_verbatim():
    if not SEED.exists():
        pytest.skip(f"the seed is not beside this clone ({SEED}); the fixture stands for it")
    seed_lines = SEED.read_text().splitlines()
    fixture_lines = [line for line in SEED_COMMAND.read_text().splitlines()
                     if not line.startswith("#")]
    start = seed_lines.index(fixture_lines[0])
    assert seed_lines[start:start + len(fixture_lines)] == fixture_lines


def test_gb200_with_draft_is_the_seeds_command_flag_by_flag():
    assert render_gb200("/app/eagle-model") == seed_argv()


def test_gb200_without_draft_is_the_seeds_command_minus_speculative_config():
    expected = seed_argv()
    index = expected.index("--speculative-config")
    del expected[index:index + 2]
    assert render_gb200(None) == expected


def test_speculative_config_is_compact_json_with_three_tokens():
    args = render_gb200("/app/eagle-model")
    config = json.loads(args[args.index("--speculative-config") + 1])
    assert config == {"model": "/app/eagle-model", "method": "eagle3", "num_speculative_tokens": 3}


def test_overrides_replace_profile_values():
    args = vllm_serve_args(PROFILES["kimi-k2.6"], model_path="/m", draft_path=None,
                           host="127.0.0.1", port=9000, tensor_parallel_size=8,
                           gpu_memory_utilization=0.85, extra_args=["--max-model-len", "65536"])
    assert args[args.index("--tensor-parallel-size") + 1] == "8"
    assert args[args.index("--gpu-memory-utilization") + 1] == "0.85"
    assert args[-6:] == ["--host", "127.0.0.1", "--port", "9000", "--max-model-len", "65536"]


def test_nvfp4_profile_adds_fp8_kv_cache_and_keeps_parsers():
    args = vllm_serve_args(PROFILES["kimi-k2.6-nvfp4"], model_path="/m", draft_path=None,
                           host="0.0.0.0", port=8000)
    assert args[args.index("--kv-cache-dtype") + 1] == "fp8"
    assert args[args.index("--tool-call-parser") + 1] == "kimi_k2"
    assert PROFILES["kimi-k2.6-nvfp4"].min_gpu_memory_gb == 600
    assert PROFILES["kimi-k2.6-nvfp4"].repo == "nvidia/Kimi-K2.6-NVFP4"


def test_kimi_profile_matches_the_recipe():
    profile = PROFILES["kimi-k2.6"]
    assert (profile.repo, profile.served_name, profile.min_gpu_memory_gb) == \
        ("moonshotai/Kimi-K2.6", "Kimi-K2.6", 714)
    assert profile.size_bytes == 595 * 10**9
    assert profile.multimodal and profile.trust_remote_code


def test_sandbox_profile_serves_the_production_name_without_gpu_flags():
    args = vllm_serve_args(PROFILES["sandbox-tiny"], model_path="/m", draft_path=None,
                           host="0.0.0.0", port=8000)
    assert args[args.index("--served-model-name") + 1] == "Kimi-K2.6"
    assert "--gpu-memory-utilization" not in args
    assert "--trust-remote-code" not in args


def test_draft_off_by_default_and_recipe_draft_named():
    data = group_data("gb200")
    assert data["model_speculative"] is False
    assert data["model_draft_repo"] == "lightseekorg/kimi-k2.6-eagle3-mla"


@pytest.mark.parametrize("argv", [
    ["/opt/vllm/venv/bin/vllm"] + seed_argv(),
    ["x", "100%", "$HOME", "it's", "a b", "back\\slash", ""],
])
def test_systemd_exec_line_round_trips(argv):
    line = systemd_exec_line(argv)
    # systemd undoes %% and $$, then splits like a shell.
    assert shlex.split(line.replace("%%", "%").replace("$$", "$")) == argv
    assert "%" not in line.replace("%%", "")
    assert "$" not in line.replace("$$", "")


def test_benchmarks_fixture_is_the_seeds_section_6_verbatim():
    if not SEED.exists():
        pytest.skip(f"the seed is not beside this clone ({SEED}); the fixture stands for it")
    from tests.helpers import seed_benchmarks_text
    assert seed_benchmarks_text() in SEED.read_text() + "\n"
