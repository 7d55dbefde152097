"""tasks/settings.py: host data is validated before any operation, with errors that name the
host, the key, what was found and what is needed."""

import pytest

from tasks.data_keys import DataError
from tasks.settings import read_settings
from tests.helpers import FakeHost, group_data


@pytest.fixture
def sandbox_data(tmp_path, controller_folders):
    """Sandbox group data with its controller artefacts stubbed by small real folders."""
    key = tmp_path / "api-key"
    key.write_text("s3cret-key\n")
    data = group_data("sandbox")
    data.update(controller_folders, vllm_api_key_file=str(key), vllm_cpu_threads_bind="1")
    return data


def test_sandbox_data_resolves(sandbox_data):
    settings = read_settings(FakeHost("sbx1", sandbox_data))
    assert settings.model_dir == "/raid/models/tiny-kimi"
    assert settings.serve_args[:2] == ["serve", "/raid/models/tiny-kimi"]
    assert settings.environment["VLLM_CPU_OMP_THREADS_BIND"] == "1"
    assert settings.api_key == "s3cret-key"
    assert settings.health_timeout_s == 600
    assert settings.draft_dir is None


MODEL_COMMIT, DRAFT_COMMIT = "0123abcd" * 5, "4567cdef" * 5


def test_speculative_on_adds_the_draft_beside_the_model(sandbox_data):
    sandbox_data.update(model_profile="kimi-k2.6", model_speculative=True,
                        model_revision=MODEL_COMMIT, model_draft_revision=DRAFT_COMMIT)
    settings = read_settings(FakeHost("h", sandbox_data))
    assert settings.draft_dir == "/raid/models/kimi-k2.6-eagle3"
    assert '"model":"/raid/models/kimi-k2.6-eagle3"' in " ".join(settings.serve_args)


def test_vllm_drains_for_the_shutdown_timeout_and_the_stop_allows_its_exit(sandbox_data):
    settings = read_settings(FakeHost("sbx1", sandbox_data))
    assert settings.serve_args[-2:] == ["--shutdown-timeout", "60"]
    assert settings.stop_timeout_s == 90
    sandbox_data["vllm_shutdown_timeout_s"] = 0  # vLLM's own default: abort at once
    settings = read_settings(FakeHost("sbx1", sandbox_data))
    assert settings.serve_args[-2:] == ["--shutdown-timeout", "0"]
    assert settings.stop_timeout_s == 30
    sandbox_data["vllm_shutdown_timeout_s"] = "60s"
    with pytest.raises(DataError) as error:
        read_settings(FakeHost("sbx1", sandbox_data))
    assert "sbx1: vllm_shutdown_timeout_s: found '60s'; need seconds, 0..3600" in str(error.value)


def test_health_timeout_is_derived_from_checkpoint_size(sandbox_data):
    sandbox_data.update(model_profile="kimi-k2.6", vllm_health_timeout_s=None,
                        vllm_load_bytes_per_s=1e9, model_revision=MODEL_COMMIT)
    assert read_settings(FakeHost("h", sandbox_data)).health_timeout_s == 120 + 595


def test_remote_code_runs_only_from_a_pinned_commit_unless_accepted(sandbox_data):
    """Kimi-K2.6 runs its repository's Python at load (--trust-remote-code): a branch or tag
    can change that code under the next fetch. Model and draft alike; the tiny sandbox model
    runs no remote code, so its `main` is fine."""
    sandbox_data.update(model_profile="kimi-k2.6", model_speculative=True)
    with pytest.raises(DataError) as error:
        read_settings(FakeHost("h", sandbox_data))
    lines = str(error.value).splitlines()[1:]
    assert lines == [
        "  h: model_revision: found 'main'; need a 40-hex commit of moonshotai/Kimi-K2.6: "
        "profile kimi-k2.6 runs the repository's Python (--trust-remote-code), so pin the "
        "code you reviewed; or model_accept_moving_revision = True",
        "  h: model_draft_revision: found 'main'; need a 40-hex commit of "
        "lightseekorg/kimi-k2.6-eagle3-mla: profile kimi-k2.6 runs the repository's Python "
        "(--trust-remote-code), so pin the code you reviewed; or model_accept_moving_revision "
        "= True"]
    sandbox_data.update(model_revision=MODEL_COMMIT.upper(), model_draft_revision="v1.0")
    with pytest.raises(DataError) as error:
        read_settings(FakeHost("h", sandbox_data))
    assert "found '0123ABCD" in str(error.value) and "found 'v1.0'" in str(error.value)
    sandbox_data.update(model_revision=MODEL_COMMIT, model_draft_revision=DRAFT_COMMIT)
    assert read_settings(FakeHost("h", sandbox_data)).model_revision == MODEL_COMMIT
    sandbox_data.update(model_revision="main", model_draft_revision="main",
                        model_accept_moving_revision=True)
    assert read_settings(FakeHost("h", sandbox_data)).model_revision == "main"
    sandbox_data.update(model_profile="sandbox-tiny", model_accept_moving_revision=False,
                        model_speculative=False)
    assert read_settings(FakeHost("h", sandbox_data)).model_revision == "main"


@pytest.mark.parametrize("listen", ["0.0.0.0", "10.0.0.5", "::"])
def test_an_open_endpoint_beyond_loopback_is_refused_unless_meant(sandbox_data, listen):
    sandbox_data.update(vllm_api_key_file=None, vllm_host=listen)
    with pytest.raises(DataError) as error:
        read_settings(FakeHost("h", sandbox_data))
    assert str(error.value).splitlines()[1:] == [
        f"  h: vllm_api_key_file: found None; need a key file (or vllm_api_key_command): "
        f"vllm_host {listen} serves beyond loopback; or vllm_accept_open_endpoint = True for "
        "an endpoint meant to be open"]
    sandbox_data["vllm_accept_open_endpoint"] = True
    assert read_settings(FakeHost("h", sandbox_data)).api_key is None


@pytest.mark.parametrize("listen", ["127.0.0.1", "::1", "localhost"])
def test_an_endpoint_on_loopback_needs_no_key(sandbox_data, listen):
    sandbox_data.update(vllm_api_key_file=None, vllm_host=listen)
    assert read_settings(FakeHost("h", sandbox_data)).listen_host == listen


def test_relative_controller_paths_are_relative_to_the_repository(sandbox_data):
    sandbox_data["vllm_api_key_file"] = "no/such/key"
    with pytest.raises(DataError) as error:
        read_settings(FakeHost("h", sandbox_data))
    assert "h: vllm_api_key_file: found 'no/such/key'; need" in str(error.value)


BAD_INPUTS = [
    ("model_profile", "kimi-k3", "one of"),
    ("model_profile", None, "one of"),
    ("model_revision", 7, "commit SHA"),
    ("model_speculative", "yes", "true or false"),
    ("model_num_speculative_tokens", 0, "1..10"),
    ("model_source_dir", "/nonexistent/model", "config.json"),
    ("weights_dir", "raid/models", "absolute path"),
    ("weights_dir", 5, "absolute path"),
    ("vllm_runtime", "podman", "one of"),
    ("vllm_port", 0, "1..65535"),
    ("vllm_port", 70000, "1..65535"),
    ("vllm_port", "8000", "1..65535"),
    ("vllm_port", True, "1..65535"),
    ("vllm_tensor_parallel_size", 0, "positive integer"),
    ("vllm_tensor_parallel_size", 2.5, "positive integer"),
    ("vllm_tensor_parallel_size", 3, "divisor of the 4 attention heads"),
    ("preflight_accept_low_gpu_memory", "yes", "true or false"),
    ("nvidia_driver_min_branch", "580", "driver branch"),
    ("nvidia_driver_min_branch", 58, "driver branch"),
    ("vllm_gpu_memory_utilization", 1.5, "(0, 1]"),
    ("vllm_gpu_memory_utilization", 0, "(0, 1]"),
    ("vllm_gpu_memory_utilization", "0.9", "(0, 1]"),
    ("vllm_extra_args", "--enforce-eager", "list of strings"),
    ("vllm_extra_args", ["--max-model-len", 4096], "list of strings"),
    ("vllm_environment", {"A": 1}, "NAME: value"),
    ("vllm_api_key_file", "/nonexistent/key", "non-empty file"),
    ("vllm_health_timeout_s", 5, "10..86400"),
    ("vllm_health_timeout_s", 10**9, "10..86400"),
    ("vllm_load_bytes_per_s", -1, "1e6..1e12"),
    ("vllm_load_bytes_per_s", 0.5, "1e6..1e12"),
    ("vllm_load_bytes_per_s", float("inf"), "1e6..1e12"),
    ("model_draft_repo", "", "owner/name"),
    ("model_draft_repo", "kimi-k2.6-eagle3", "owner/name"),
    # Read by the infra checks only (tests/infra): out of range, their checks pass regardless.
    ("weights_min_free_bytes", -1, "0..1e15"),
    ("weights_min_free_bytes", 1e16, "0..1e15"),
    ("weights_min_free_bytes", None, "0..1e15"),
    ("nvidia_allreduce_min_busbw_gbps", {"NVIDIA H200": 0}, "(0, 10000]"),
    ("nvidia_allreduce_min_busbw_gbps", {"NVIDIA H200": -300}, "(0, 10000]"),
    ("nvidia_allreduce_min_busbw_gbps", {"NVIDIA H200": "300"}, "(0, 10000]"),
    ("nvidia_allreduce_min_busbw_gbps", 300, "mapping of GPU model"),
    ("nvidia_allreduce_bytes", 0, "2**20..2**35"),
    ("nvidia_allreduce_bytes", 2**40, "2**20..2**35"),
    ("nvidia_gpu_model", "", "the name nvidia-smi reports"),
    ("nvidia_gpu_model", 200, "the name nvidia-smi reports"),
    ("vllm_wheelhouse_dir", None, "wheelhouse"),
    ("vllm_wheelhouse_dir", "/nonexistent/wheelhouse", "requirements.lock"),
    ("host_packages", "curl", "list of Debian package names"),
]


@pytest.mark.parametrize("key,value,need", BAD_INPUTS, ids=[f"{k}={v!r}" for k, v, _ in BAD_INPUTS])
def test_bad_input_is_refused_naming_host_and_key(sandbox_data, key, value, need):
    sandbox_data[key] = value
    with pytest.raises(DataError) as error:
        read_settings(FakeHost("tray-07", sandbox_data))
    lines = [str(problem) for problem in error.value.problems]
    assert any(line.startswith(f"tray-07: {key}: found ") and need in line.split("; need ")[1]
               for line in lines), str(error.value)


def test_every_problem_is_reported_together(sandbox_data):
    sandbox_data.update(vllm_port=-1, vllm_gpu_memory_utilization=2.0, model_profile="nope")
    with pytest.raises(DataError) as error:
        read_settings(FakeHost("h", sandbox_data))
    message = str(error.value)
    for key in ("vllm_port", "vllm_gpu_memory_utilization", "model_profile"):
        assert f"h: {key}: found " in message


def test_api_key_never_appears_in_the_rendered_command(sandbox_data):
    settings = read_settings(FakeHost("h", sandbox_data))
    assert "s3cret-key" not in " ".join(settings.serve_args)
    assert "s3cret-key" not in str(settings.environment)


def test_gb200_group_data_resolves_to_the_seeds_container():
    """Production data needs nothing from the controller: the docker runtime pulls the seed's
    image, which the seed ran on GB200 (aarch64)."""
    settings = read_settings(FakeHost("gb200-tray-01", group_data("gb200")))
    assert settings.runtime == "docker"
    assert settings.image_for("aarch64") == "vllm/vllm-openai:v0.19.1-cu130"
    assert settings.image_archive is None and settings.wheelhouse_dir is None
    assert settings.container_gpus == "gpus"


def test_the_venv_runtime_needs_a_wheelhouse():
    data = {**group_data("gb200"), "vllm_runtime": "venv"}
    with pytest.raises(DataError) as error:
        read_settings(FakeHost("gb200-tray-01", data))
    assert [(p.host, p.key) for p in error.value.problems] == [("gb200-tray-01",
                                                                "vllm_wheelhouse_dir")]


def test_the_infra_keys_defaults_and_edges_resolve(sandbox_data):
    """The ranges hold the defaults and their edges: 0 free bytes (no headroom asked) and a
    mapping with no threshold (every model skips, saying so) are choices, not typos."""
    for key, value in (("weights_min_free_bytes", 0), ("weights_min_free_bytes", 1e11),
                       ("nvidia_allreduce_min_busbw_gbps", {}),
                       ("nvidia_allreduce_min_busbw_gbps", {"NVIDIA H200": 300.5}),
                       ("nvidia_allreduce_bytes", 2**20), ("nvidia_gpu_model", None),
                       ("vllm_load_bytes_per_s", 1e6), ("vllm_health_timeout_s", 86400),
                       # gpu-check names the interpreter on PATH (a real H200 run found it).
                       ("nvidia_allreduce_python", "python3"),
                       ("nvidia_allreduce_python", "/opt/torch/bin/python")):
        assert read_settings(FakeHost("tray-07", {**sandbox_data, key: value})).host_name == "tray-07"
