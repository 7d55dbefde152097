"""GPUs as the host's data expects them: enough for tensor parallel, the right model, enough
memory, a recent driver branch, no MIG, and the NVLink fabric up on NVL trays. A host with
no NVIDIA device on its PCI bus whose profile needs none (the sandbox) skips these, and the
report says so; a GPU host checks its GPUs whatever the model."""

import pytest

from tasks.facts import NvidiaGpus, NvidiaPciGpus, NvidiaSmiInfo
from tasks.preflight import NVL_GPU_MARKERS, gpu_memory_problem, needs_gpus
from tasks.vllm_container import CONTAINER_NAME
from tests.helpers import run_fact


@pytest.fixture(scope="session")
def gpus(host, settings):
    if not needs_gpus(settings) and not run_fact(host, NvidiaPciGpus):
        pytest.skip(f"no NVIDIA GPU on the PCI bus, and profile {settings.profile.name} runs "
                    "without: no GPU to check")
    return run_fact(host, NvidiaGpus)


def test_enough_gpus_for_tensor_parallel(gpus, settings):
    assert len(gpus) >= settings.tensor_parallel_size, \
        f"{len(gpus)} GPU(s) visible, tensor parallel {settings.tensor_parallel_size}"


def test_gpu_model_is_the_expected_one(gpus, host_data):
    expected = host_data.get("nvidia_gpu_model")
    if not expected:
        pytest.skip("nvidia_gpu_model is not set for this host")
    assert {gpu["name"] for gpu in gpus} == {expected}


def test_gpu_memory_holds_the_model(gpus, settings):
    """The preflight's rule: the profile's minimum, or with preflight_accept_low_gpu_memory
    the weights alone (a tight KV cache is accepted, weights that do not fit never are)."""
    used = gpus[:settings.tensor_parallel_size]
    if not used:
        pytest.skip("no GPU visible (test_enough_gpus_for_tensor_parallel reports it)")
    problem = gpu_memory_problem(settings, used)
    assert problem is None, problem


def test_driver_branch_is_recent_enough(gpus, settings):
    branches = {int(gpu["driver"].split(".")[0]) for gpu in gpus}
    assert min(branches) >= settings.driver_min_branch, f"driver branches {sorted(branches)}"


def test_no_gpu_is_in_mig_mode(gpus):
    assert [gpu["index"] for gpu in gpus if gpu["mig"]] == []


def test_nvlink_fabric_is_up_on_nvl_trays(gpus, host):
    if not gpus:
        pytest.skip("no GPU visible (test_enough_gpus_for_tensor_parallel reports it)")
    if not any(marker in gpu["name"] for gpu in gpus for marker in NVL_GPU_MARKERS):
        pytest.skip(f"{gpus[0]['name']} is not on an NVLink fabric tray")
    info = run_fact(host, NvidiaSmiInfo)
    assert {gpu["fabric_state"] for gpu in info["gpus"]} == {"Completed"}


def test_the_container_sees_the_gpus(gpus, host, settings):
    if settings.runtime != "docker":
        pytest.skip(f"vllm_runtime {settings.runtime}: vLLM sees the host's GPUs directly")
    listed = host.check_output(f"docker exec {CONTAINER_NAME} nvidia-smi -L").splitlines()
    assert len([line for line in listed if line.startswith("GPU ")]) >= \
        settings.tensor_parallel_size, listed
