"""GB200 trays: aarch64 Grace CPUs, 4 Blackwell GPUs of ~189 GB each, weights on /raid."""

# The seed's model and layout. Kimi-K2.6 INT4 asks for >= 714 GB of GPU memory and a tray
# gives ~680 GB at 0.90 utilisation; the seed ran it anyway with a tight KV cache, and so does
# this group (False makes the preflight refuse it). The kimi-k2.6-nvfp4 profile (600 GB
# minimum) is the roomier choice on Blackwell.
model_profile = "kimi-k2.6"
preflight_accept_low_gpu_memory = True
weights_dir = "/raid/models"
vllm_port = 8000
# What nvidia-smi reports on a GB200 tray (the seed's table).
nvidia_gpu_model = "NVIDIA GB200"
# The seed's runtime: the pinned vllm/vllm-openai image (vllm_image) under systemd.
vllm_runtime = "docker"
# The hf CLI's wheels for the trays' CPU and Python (Ubuntu 24.04 on Grace), apart from the
# sandbox's. Build them with
#   hf-wheelhouse --arch aarch64 --python-version 3.12 --out .cache/hf-wheelhouse-gb200
hf_cli_wheelhouse_dir = ".cache/hf-wheelhouse-gb200"
