"""The production commands an SRE runs from the controller (or, gpu-check, on a GPU host).

Each module is one command with a ``main()``; pyproject.toml installs it as a console script
into .venv/bin (`make venv`, then `. .venv/bin/activate`):

    drift-check     tools/drift_check.py    read-only: planned changes and failed infra checks
    bench-report    tools/bench_report.py   a benchmark run against a baseline; speculative A/B
    gpu-check       tools/gpu_check.py      GPU acceptance on the GPU host itself (@local)
    chat            tools/chat.py           one chat completion from every endpoint
    wheelhouse      tools/wheelhouse.py     the hosts' offline wheels: vLLM (CPU build) ...
    hf-wheelhouse   tools/wheelhouse.py     ... and the hf CLI, one builder for both
    data-keys-table tools/data_keys_table.py  README's data-keys table from tasks/data_keys.py

Shared code lives in tools/repository.py (where the checkout is, group data, the one-line
"run make venv" refusal) and tools/inventory.py (an inventory's hosts as JSON). This package
imports neither `harness` (the sandbox the tests run) nor `tests`: production never depends on
the test harness; the harness may import from here.
"""
