"""Sandbox hosts (tools/sandbox): the tiny model on the CPU build of vLLM, all offline."""

model_profile = "sandbox-tiny"
model_source_dir = ".cache/tiny-model"  # tools/make-tiny-model
vllm_wheelhouse_dir = ".cache/wheelhouse"  # tools/wheelhouse
# Two cores shared by every sandbox host: starting the CPU engine takes ~20-60 s there.
vllm_health_timeout_s = 300
# The sandbox shares this machine's disk: ask the infra checks for little.
weights_min_free_bytes = 10**9
