#!/usr/bin/env bash
# Benchmark the deploy loop on sandbox hosts and print a markdown table for the README:
#   - time from `sandbox up` to the first token answered by vLLM (boot + deploy + chat)
#   - wall time of a no-op re-run of the deploy (median of 5), for each host count
#   - wall time of drift-check on the converged hosts (median of 3)
#
#     bench-deploy [HOST_COUNT ...]      (default: 1 4; needs root and `make venv artefacts`)
#     SANDBOX_RUNTIME=docker bench-deploy 1    (the docker runtime: image pushed and loaded)
#     BENCH_RESTARTS=3 bench-deploy 1    (also: restart to healthy on the first host, N times
#                                         with vLLM's compile cache kept, N times cleaned)
#
# harness/bench_deploy.py runs this script; the commands it times are the console scripts
# `make venv` installs into .venv/bin, put first on PATH below.
#
# Uses its own sandbox ("bench") and tears it down after each host count.
set -euo pipefail
cd "$(dirname "$0")/.."
export SANDBOX_NAME=bench PATH="$PWD/.venv/bin:$PATH" PYTHONUNBUFFERED=1
counts=("${@:-1}")
[ $# -eq 0 ] && counts=(1 4)

now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", b - a }'; }
middle() { printf '%s\n' "$@" | sort -n | sed -n "$(( ($# + 1) / 2 ))p"; }

# Seconds from `systemctl start vllm.service` to /health answering on the host, after a stop
# that keeps the unit's CacheDirectory (vLLM's and Inductor's compile caches) or, with
# "cleaned", empties it first (`systemctl clean --what=cache`, the unit stopped).
restart_s() {
  local host=$1 cache=$2 a b
  sandbox ssh "$host" systemctl stop vllm.service
  [ "$cache" = cleaned ] && sandbox ssh "$host" systemctl clean --what=cache vllm.service
  a=$(now)
  sandbox ssh "$host" systemctl start vllm.service
  sandbox ssh "$host" timeout 900 sh -c "'until curl -fs -o /dev/null --max-time 2 \
    http://127.0.0.1:8000/health; do sleep 0.5; done'"
  b=$(now)
  elapsed "$a" "$b"
}

trap 'sandbox down >/dev/null 2>&1 || true' EXIT
rows=() restarts=()
for count in "${counts[@]}"; do
  sandbox down >/dev/null 2>&1 || true
  start=$(now)
  sandbox up "$count" >/dev/null
  booted=$(now)
  pyinfra -y inventories/sandbox.py deploy.py >/tmp/bench-deploy.log 2>&1 \
    || { tail -30 /tmp/bench-deploy.log; exit 1; }
  deployed=$(now)
  chat >/dev/null
  answered=$(now)
  runs=()
  for _ in 1 2 3 4 5; do
    a=$(now)
    pyinfra -y inventories/sandbox.py deploy.py >/tmp/bench-noop.log 2>&1
    b=$(now)
    grep -q "Grand total" /tmp/bench-noop.log
    runs+=("$(elapsed "$a" "$b")")
  done
  median=$(middle "${runs[@]}")
  drifts=()
  for _ in 1 2 3; do
    a=$(now)
    drift-check inventories/sandbox.py --out /tmp/bench-drift >/tmp/bench-drift.log 2>&1 \
      || { cat /tmp/bench-drift.log; exit 1; }
    b=$(now)
    drifts+=("$(elapsed "$a" "$b")")
  done
  drift=$(middle "${drifts[@]}")
  rows+=("| $count | $(elapsed "$start" "$booted") s | $(elapsed "$booted" "$deployed") s | $(elapsed "$start" "$answered") s | $median s (runs: ${runs[*]}) | $drift s (runs: ${drifts[*]}) |")
  if [ "${BENCH_RESTARTS:-0}" -gt 0 ]; then
    for cache in kept cleaned; do
      took=()
      for _ in $(seq "$BENCH_RESTARTS"); do took+=("$(restart_s "${SANDBOX_NAME}1" "$cache")"); done
      restarts+=("| $count | $cache | $(middle "${took[@]}") s (runs: ${took[*]}) |")
    done
  fi
  sandbox down >/dev/null
done
echo "| hosts | sandbox up | first deploy | up -> first token | no-op re-run (median of 5) | drift check (median of 3) |"
echo "|---|---|---|---|---|---|"
printf '%s\n' "${rows[@]}"
if [ "${#restarts[@]}" -gt 0 ]; then
  echo
  echo "| hosts | compile cache | restart to healthy, first host (median of $BENCH_RESTARTS) |"
  echo "|---|---|---|"
  printf '%s\n' "${restarts[@]}"
fi
