"""Optional acceptance test of the GPU interconnect: an all-reduce across all of the host's
GPUs with PyTorch + NCCL, one process per GPU, and its bus bandwidth against the host data's
threshold for the GPU model. Run it with `-m interconnect`; leave it out with
`-m "not interconnect"` (it holds every GPU for a few seconds: not while serving traffic).

NVLink multicast (NVLS) stays off: a program using it can take a shared host's GPUs out of
service, and the number measured here is the plain ring/tree all-reduce anyway.
"""

import json

import pytest

from tasks.facts import NvidiaGpus, NvidiaPciGpus
from tasks.preflight import needs_gpus
from tests.helpers import run_fact

pytestmark = pytest.mark.interconnect

# Runs on the host under the data's Python (one with torch and NCCL: the vLLM venv on GPU
# hosts). Bus bandwidth as nccl-tests defines it for all-reduce: size / time * 2 (n - 1) / n.
ALL_REDUCE = r'''
import json, os, sys, time
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def worker(rank, world, size_bytes, iterations, port, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=world)
    check = torch.full((1024,), float(rank + 1), device="cuda")
    dist.all_reduce(check)
    correct = bool(torch.all(check == world * (world + 1) / 2))
    data = torch.ones(size_bytes // 2, dtype=torch.bfloat16, device="cuda")
    for _ in range(5):
        dist.all_reduce(data)
    torch.cuda.synchronize()
    dist.barrier()
    started = time.perf_counter()
    for _ in range(iterations):
        dist.all_reduce(data)
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - started) / iterations
    if rank == 0:
        results.put({"seconds": seconds, "correct": correct})
    dist.destroy_process_group()


if __name__ == "__main__":
    size_bytes, iterations, port = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    world = torch.cuda.device_count()
    context = mp.get_context("spawn")
    results = context.Queue()
    processes = [context.Process(target=worker, args=(rank, world, size_bytes, iterations,
                                                      port, results)) for rank in range(world)]
    for process in processes:
        process.start()
    result = results.get(timeout=600)
    for process in processes:
        process.join(timeout=120)
    algorithm_bandwidth = size_bytes / result["seconds"]
    print(json.dumps({"gpus": world, "bytes": size_bytes, "seconds": result["seconds"],
                      "correct": result["correct"],
                      "algbw_gbps": algorithm_bandwidth / 1e9,
                      "busbw_gbps": algorithm_bandwidth * 2 * (world - 1) / world / 1e9,
                      "torch": torch.__version__, "nccl": ".".join(map(str, torch.cuda.nccl.version()))}))
'''


def test_all_reduce_bus_bandwidth_meets_the_threshold(host, host_data, settings):
    if not needs_gpus(settings) and not run_fact(host, NvidiaPciGpus):
        pytest.skip(f"no NVIDIA GPU on the PCI bus, and profile {settings.profile.name} runs "
                    "without: no interconnect")
    gpus = run_fact(host, NvidiaGpus)
    if len(gpus) < 2:
        pytest.skip(f"{len(gpus)} GPU visible: an all-reduce needs at least 2")
    thresholds = host_data["nvidia_allreduce_min_busbw_gbps"]
    model = gpus[0]["name"]
    if model not in thresholds:
        pytest.skip(f"no bus bandwidth threshold for {model} in nvidia_allreduce_min_busbw_gbps")
    python = host_data["nvidia_allreduce_python"] or f"{settings.venv_dir}/bin/python"
    script = host.check_output("mktemp --suffix=.py")
    try:
        host.check_output(f"cat > {script} <<'EOF'\n{ALL_REDUCE}\nEOF")
        result = host.run(f"NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 "
                          f"{python} {script} {host_data['nvidia_allreduce_bytes']} 20 29517")
    finally:
        host.run(f"rm -f {script}")
    assert result.rc == 0, result.stderr[-2000:]
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    print(f"all-reduce on {measured['gpus']} x {model}: "
          f"{measured['busbw_gbps']:.1f} GB/s bus bandwidth ({measured})")
    assert measured["correct"], "the all-reduce returned a wrong sum"
    assert measured["busbw_gbps"] >= thresholds[model], \
        f"{measured['busbw_gbps']:.1f} GB/s < {thresholds[model]} GB/s for {model}"
