"""GB200 trays: aarch64 Grace CPUs, 4 Blackwell GPUs of ~189 GB each, weights on /raid."""

# The seed's model and layout. Kimi-K2.6 INT4 asks for >= 714 GB of GPU memory and a tray
# gives ~680 GB at 0.90 utilisation; the seed ran it anyway with a tight KV cache, and so does
# this group (False makes the preflight refuse it). The kimi-k2.6-nvfp4 profile (600 GB
# minimum) is the roomier choice on Blackwell.
model_profile = "kimi-k2.6"
preflight_accept_low_gpu_memory = True
weights_dir = "/raid/models"
# 595 GB from the Hub once per rack, not once per tray: the first tray fetches, the others copy
# tray to tray (each file checked against the Hub's sha256), falling back to the Hub. Each tray
# serves its verified weights on weights_peer_port at its ssh_hostname: if that is not on the
# trays' private network, set weights_peer_address per tray in inventories/gb200.py.
weights_peer_copy = True
vllm_port = 8000
# What nvidia-smi reports on a GB200 tray (the seed's table).
nvidia_gpu_model = "NVIDIA GB200"
# The seed's runtime: the pinned vllm/vllm-openai image (vllm_image) under systemd.
vllm_runtime = "docker"
# The hf CLI's wheels for the trays' CPU and Python (Ubuntu 24.04 on Grace), apart from the
# sandbox's. Build them with
#   hf-wheelhouse --arch aarch64 --python-version 3.12 --out .cache/hf-wheelhouse-gb200
hf_cli_wheelhouse_dir = ".cache/hf-wheelhouse-gb200"
# Two of the seed's choices, each accepted here in so many words (the defaults refuse them):
# - the model's `main` branch, though Kimi-K2.6 runs its repository's Python
#   (--trust-remote-code): set model_revision to the 40-hex commit you reviewed (the Hub's
#   `HfApi().model_info("moonshotai/Kimi-K2.6").sha` gives the branch's current one), then
#   delete this line;
# - an endpoint open to whoever reaches port 8000: set vllm_api_key_file (a controller file
#   holding the key clients must send), then delete this line.
model_accept_moving_revision = True
vllm_accept_open_endpoint = True
