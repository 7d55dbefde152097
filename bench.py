"""The benchmark runbook: the seed's `vllm bench serve` (section 6) on every serving host, kept
at home.

    pyinfra inventories/gb200.py bench.py                                 # the seed's workload
    pyinfra inventories/sandbox.py bench.py --data bench_profile=sandbox  # tiny, on the CPU
    bench-report compare results/bench/<run id>                     # vs the seed

Each host benchmarks its own endpoint once /health answers, so a benchmark never measures a
server a deploy is restarting, with the client of the runtime's own vLLM (the venv, or a
throwaway container of the pinned image). A workload longer than the served context is refused
before any request; a run with any failed request fails. Results land in
results/bench/<run id>/<host>.json.

Speculative decoding A/B (the same workload with and without the EAGLE-3 draft):

    pyinfra INVENTORY deploy.py --data model_speculative=false
    pyinfra INVENTORY bench.py --data bench_run_id=spec-off
    pyinfra INVENTORY deploy.py --data model_speculative=true
    pyinfra INVENTORY bench.py --data bench_run_id=spec-on
    bench-report ab results/bench/spec-off results/bench/spec-on
"""

from pyinfra import host

from tasks import bench
from tasks.inventory_check import serves

# The control hosts and the routers serve nothing: only the serving hosts run it.
if serves(host.groups):
    # 1. Wait for /health; 2. refuse a workload longer than the served context; 3. scrape
    #    /metrics, run `vllm bench serve`, scrape again, fail on any failed request; 4. bring
    #    the result, the scrapes and the client's log home.
    bench.run()
