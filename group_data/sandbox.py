"""Sandbox hosts (sandbox): the tiny model on the CPU build of vLLM, all offline."""

from platform import machine as _machine  # sandbox hosts share the controller's CPU

model_profile = "sandbox-tiny"
model_source_dir = ".cache/tiny-model"  # make-tiny-model
vllm_wheelhouse_dir = ".cache/wheelhouse"  # wheelhouse
# Two cores shared by every sandbox host: starting the CPU engine takes ~20-60 s alone, and
# over 5 minutes when two trays of the e2e fleet restart while the third serves (CI, measured).
vllm_health_timeout_s = 600
# The sandbox shares this machine's disk: ask the infra checks for little.
weights_min_free_bytes = 10**9
# docker runtime (SANDBOX_RUNTIME=docker, inventories/sandbox.py): the CPU image vllm-image
# builds from the wheelhouse, pushed and `docker load`-ed (no registry is reachable), no GPUs.
vllm_image = {_machine(): "vllm-sandbox:0.32.0-cpu"}
vllm_image_tarball = ".cache/vllm-image/vllm-sandbox_0.32.0-cpu.tar"  # vllm-image
vllm_container_gpus = "none"
