#!/usr/bin/env bash
# Run the GPU facts, the preflight and the GPU infra checks on THIS machine (pyinfra's @local
# connector), as an acceptance run on a real GPU host, and keep what they print.
#
#     gpu-check OUT_DIR [PYTHON]          (tools/gpu_check.py runs this script)
#
# Nothing is changed: pyinfra only plans (--dry) and the checks only read. Cases:
#   facts.json             every custom fact, as pyinfra reads it here
#   preflight-pass.txt     tensor parallel = every GPU here, with a catalog profile these GPUs
#                          hold (see "The passing profile" below): passes
#   preflight-tp.txt       tensor parallel beyond the GPUs here (4, or 8 on 4+ GPUs): refused
#   preflight-memory.txt   kimi-k2.6-nvfp4 at TP 1 without the override: refused on memory
#   preflight-weights.txt  the same with the override and 600 GB of (sparse) weights: refused,
#                          the override accepts a tight KV cache, not weights that do not fit
#   infra-gpus.txt         tests/infra/test_gpus.py as preflight-pass.txt: every check collected
#                          passes or skips with its reason, the memory check passes
#   infra-gpus-tp.txt      the same beyond the GPUs here: the GPU-count check fails
#   infra-interconnect.txt the all-reduce acceptance test (-m interconnect): bus bandwidth
#                          measured on 2+ GPUs, skipped with its reason on one
# Exit status: 0 when every case behaved as described, 1 otherwise.
set -uo pipefail
out=${1:?usage: gpu-check OUT_DIR [PYTHON]}
python=${2:-python3}
cd "$(dirname "$0")/.."
mkdir -p "$out"
stub=$(mktemp -d)
trap 'rm -rf "$stub"' EXIT
# The data names controller folders for the weights and wheels; plans only need them to exist.
mkdir -p "$stub/model" "$stub/wheelhouse"
echo '{}' >"$stub/model/config.json"
echo '# stub' >"$stub/wheelhouse/requirements.lock"
# The stand-in weights run no code, and the endpoint is never served here: the revision may
# move and the endpoint needs no key on loopback (the data rules that refuse both otherwise).
stand_in=(model_accept_moving_revision=true vllm_host=127.0.0.1)
common=(--data "model_source_dir=$stub/model" --data "vllm_wheelhouse_dir=$stub/wheelhouse"
        "${stand_in[@]/#/--data=}")
gpu_model=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
gpus=$(nvidia-smi --query-gpu=index --format=csv,noheader | wc -l)
too_many=$(( gpus < 4 ? 4 : 2 * gpus ))
status=0

expect() {  # expect NAME "text that must appear" -- command...
  local name=$1 needle=$2; shift 3
  "$@" >"$out/$name" 2>&1
  if grep -qF -- "$needle" "$out/$name"; then
    echo "ok    $name: found: $needle"
  else
    echo "FAIL  $name: missing: $needle"; status=1
  fi
}

"$python" -m pyinfra --json @local fact tasks.facts.NvidiaGpus tasks.facts.NvidiaPciGpus \
  tasks.facts.NvidiaSmiInfo \
  tasks.facts.CpuArchitecture tasks.facts.FreeBytes path=/raid/models \
  tasks.facts.ListeningTcpPorts >"$out/facts.json" 2>"$out/facts.log" \
  && echo "ok    facts.json" || { echo "FAIL  facts.json"; status=1; }

# The passing profile: the most demanding GPU profile of tasks/models.py whose minimum these
# GPUs hold at tensor parallel = every GPU, so that no override is needed. Where none does (the
# catalog's smallest GPU profile asks for 600 GB: an H200 box of fewer than 5 GPUs), it is
# kimi-k2.6-nvfp4 with preflight_accept_low_gpu_memory, whose weights rule still applies: the
# stand-in weights here (a few bytes) fit.
read -r pass_profile pass_override < <("$python" - "$gpus" <<'EOF'
import subprocess
import sys

from tasks.models import PROFILES

gpus = int(sys.argv[1])
mib = [int(value) for value in subprocess.check_output(
    ["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
    text=True).split()]
fits = [profile for profile in PROFILES.values() if profile.min_gpu_memory_gb > 0
        and profile.attention_heads % gpus == 0
        and sum(mib[:gpus]) / 1024 * (profile.gpu_memory_utilization or 0.9)
        >= profile.min_gpu_memory_gb]
best = max(fits, key=lambda profile: profile.min_gpu_memory_gb, default=None)
print(f"{best.name} false" if best else "kimi-k2.6-nvfp4 true")
EOF
)
if [ "$pass_override" = true ]; then
  echo "note  no GPU profile of tasks/models.py fits $gpus x $gpu_model: the passing cases take" \
       "$pass_profile with preflight_accept_low_gpu_memory (weights: a few bytes)"
fi
passing=(--data "model_profile=$pass_profile" --data "vllm_tensor_parallel_size=$gpus"
         --data "preflight_accept_low_gpu_memory=$pass_override")

expect preflight-pass.txt "Preflight | Check data, GPUs, disk and port" -- \
  "$python" -m pyinfra @local deploy.py --dry "${common[@]}" "${passing[@]}"
if grep -q "preflight: " "$out/preflight-pass.txt"; then
  echo "FAIL  preflight-pass.txt: a problem was reported"; status=1
fi
expect preflight-tp.txt "vllm_tensor_parallel_size: found $gpus visible GPU(s); need at least $too_many" -- \
  "$python" -m pyinfra @local deploy.py --dry "${common[@]}" \
  --data model_profile=kimi-k2.6-nvfp4 --data "vllm_tensor_parallel_size=$too_many"
# What the refusal says of one of these GPUs (vLLM's default utilisation, 0.90).
one_gpu=$("$python" -c 'import sys; gb = int(sys.argv[1]) / 1024
print(f"found {gb * 0.9:.0f} GB usable (1 x {gb:.0f} GB x 0.90)")' \
  "$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1)")
expect preflight-memory.txt "vllm_gpu_memory_utilization: $one_gpu" -- \
  "$python" -m pyinfra @local deploy.py --dry "${common[@]}" \
  --data model_profile=kimi-k2.6-nvfp4 --data vllm_tensor_parallel_size=1
# 600 GB that take no disk: the preflight counts the folder's bytes and refuses before reading.
mkdir -p "$stub/big-model"
cp "$stub/model/config.json" "$stub/big-model/"
truncate -s 600000000000 "$stub/big-model/model.safetensors"
expect preflight-weights.txt "need >= 600 GB to hold kimi-k2.6-nvfp4's weights (preflight_accept_low_gpu_memory accepts a tight KV cache, not weights that do not fit)" -- \
  "$python" -m pyinfra @local deploy.py --dry --data "model_source_dir=$stub/big-model" \
  --data "vllm_wheelhouse_dir=$stub/wheelhouse" "${stand_in[@]/#/--data=}" \
  --data model_profile=kimi-k2.6-nvfp4 \
  --data vllm_tensor_parallel_size=1 --data preflight_accept_low_gpu_memory=true

suite_passed() {  # suite_passed NAME: every test pytest collected passed or skipped
  local file=$out/$1 collected summary passed skipped
  collected=$(sed -n 's/^collected \([0-9]*\) items*$/\1/p' "$file")
  summary=$(grep -E '^=+ .*[0-9]+ (passed|skipped|failed|errors?)' "$file" | tail -1)
  passed=$(grep -oE '[0-9]+ passed' <<<"$summary" | cut -d' ' -f1)
  skipped=$(grep -oE '[0-9]+ skipped' <<<"$summary" | cut -d' ' -f1)
  if [ -n "$collected" ] && ! grep -qE '[0-9]+ (failed|errors?)' <<<"$summary" \
     && [ $(( ${passed:-0} + ${skipped:-0} )) -eq "$collected" ]; then
    echo "ok    $1: $collected collected, ${passed:-0} passed, ${skipped:-0} skipped"
  else
    echo "FAIL  $1: ${collected:-no} tests collected; summary: ${summary:-none}"; status=1
  fi
}

infra=("$python" -m pytest tests/infra/test_gpus.py --inventory=@local -rfEsp -p no:cacheprovider
       --infra-data "model_source_dir=$stub/model" --infra-data "vllm_wheelhouse_dir=$stub/wheelhouse"
       --infra-data "nvidia_gpu_model=$gpu_model" "${stand_in[@]/#/--infra-data=}")
expect infra-gpus.txt "PASSED tests/infra/test_gpus.py::test_gpu_memory_holds_the_model[@local]" -- \
  "${infra[@]}" --infra-data "model_profile=$pass_profile" \
  --infra-data "preflight_accept_low_gpu_memory=$pass_override" \
  --infra-data "vllm_tensor_parallel_size=$gpus"
suite_passed infra-gpus.txt
expect infra-gpus-tp.txt "FAILED tests/infra/test_gpus.py::test_enough_gpus_for_tensor_parallel" -- \
  "${infra[@]}" --infra-data model_profile=kimi-k2.6-nvfp4 \
  --infra-data "vllm_tensor_parallel_size=$too_many"
if [ "$gpus" -ge 2 ]; then interconnect_says="all-reduce on $gpus x $gpu_model"
else interconnect_says="1 GPU visible: an all-reduce needs at least 2"; fi
infra[3]=tests/infra/test_gpu_interconnect.py
expect infra-interconnect.txt "$interconnect_says" -- "${infra[@]}" -m interconnect -s \
  --infra-data "model_profile=$pass_profile" \
  --infra-data "preflight_accept_low_gpu_memory=$pass_override" \
  --infra-data "vllm_tensor_parallel_size=$gpus" --infra-data "nvidia_allreduce_python=$python"
exit $status
