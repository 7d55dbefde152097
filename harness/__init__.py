"""The sandbox harness: what the tests (and `make demo`) run to prove the deploy with no GB200.

Each module is one command with a ``main()``; pyproject.toml installs it as a console script
into .venv/bin (`make venv`, then `. .venv/bin/activate`):

    sandbox          harness/sandbox.py          disposable systemd-nspawn hosts
    hub-mirror       harness/hub_mirror.py       local folders served as Hugging Face Hub repos
    vllm-image       harness/vllm_image.py       the sandbox's vLLM image, built offline
    make-tiny-model  harness/make_tiny_model.py  the tiny random-weight model the sandbox serves
    gb200-dry-run    harness/gb200_dry_run.py    the whole GB200 plan against @fake trays
    bench-deploy     harness/bench_deploy.py     the deploy loop's timings, on its own sandbox

Not commands: harness/gb200_fake_inventory.py (a pyinfra inventory: every host of
inventories/gb200.py as an @fake host), harness/seed_facts.py (what the seed's tray answers)
and harness/gpu_hardened.py (`python3 -m harness.gpu_hardened`: vllm.service's sandbox rebuilt
by hand, for a GPU host without systemd).

The harness may import the production package `tools` (tools/repository.py); `tools` never
imports the harness.
"""
