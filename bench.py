"""The benchmark runbook: the seed's `vllm bench serve` (section 6) on every host, kept at home.

    pyinfra inventories/gb200.py bench.py                                 # the seed's workload
    pyinfra inventories/sandbox.py bench.py --data bench_profile=sandbox  # tiny, on the CPU
    tools/bench-report compare results/bench/<run id>                     # vs the seed

Each host benchmarks its own endpoint once /health answers, so a benchmark never measures a
server a deploy is restarting. Results land in results/bench/<run id>/<host>.json.

Speculative decoding A/B (the same workload with and without the EAGLE-3 draft):

    pyinfra INVENTORY deploy.py --data model_speculative=false
    pyinfra INVENTORY bench.py --data bench_run_id=spec-off
    pyinfra INVENTORY deploy.py --data model_speculative=true
    pyinfra INVENTORY bench.py --data bench_run_id=spec-on
    tools/bench-report ab results/bench/spec-off results/bench/spec-on
"""

from tasks import bench

# 1. Wait for /health; 2. scrape /metrics, run `vllm bench serve`, scrape again; 3. bring the
#    result, the scrapes and the client's log home.
bench.run()
