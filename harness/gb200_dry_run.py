"""The whole GB200 plan with no machine: the hosts of inventories/gb200.py planned (`pyinfra ...
deploy.py --dry`) as `@fake` hosts that answer as the seed's GB200 tray, with the Hub served
offline.

    gb200-dry-run [--runtime docker|kubernetes] [--json | --rollout] [--commands FILE]
                  [PYINFRA ARGS ...]

--runtime: the trays' vllm_runtime (default: group_data/gb200.py's, docker); kubernetes adds
the inventory's example k8s_control host, which plans the objects and `kubectl apply`.
--json: pyinfra's `--dry --json` plan on stdout (`hosts_with_change` per operation); without
it, pyinfra's "Detected changes" table. --commands FILE: also write, per host, every planned
operation with the commands it would run ({host: {operation: [command, ...]}}, secrets masked
as pyinfra masks them; uploads as "upload DEST"), from a second deploy file that only reads
the plan. --rollout: instead of the plan, the roll-out it asks for (`rollout --plan`: the trays
that restart vLLM, canary first, in batches of vllm_rollout_batch, out of which routers).
Other arguments go to pyinfra as they are (e.g.
`--data model_speculative=True`, `-v`). The exit status is pyinfra's, or 1 when the preflight
refuses the deploy (pyinfra's `--dry` plans a refused deploy and exits 0; the real run would
stop): the tool then repeats the preflight's problems at the end, one line each, as the deploy
prints them. Bad data (an unknown model_profile, a draft repo that is no repo id) is named
there too: the tool serves no repo for it and leaves the verdict to the preflight.

How: harness/gb200_fake_inventory.py puts every host of inventories/gb200.py on the fake
connector, the trays answering the fact fixtures of the seed's tray (harness/seed_facts.py).
The preflight asks the Hub, from the controller, for the weights' listing; this tool serves a
repo shaped like the profile's (its shards as sparse files adding up to the profile's size: no
disk used) from hub-mirror on 127.0.0.1, with a pre-written hash cache so that nothing is
hashed, and passes `--data weights_hf_endpoint=URL`. The mirror serves `main` only: a model_revision pinned
to another commit is refused by the preflight, as the Hub would refuse an unknown one.
Everything lives in a temporary folder, removed on exit; the mirror is stopped by its PID.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import runpy
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from harness import hub_mirror
from tools.repository import REPO, group_data, missing_packages, venv_command

# The inventory this tool plans: inventories/gb200.py's hosts, faked.
FAKE_INVENTORY = "harness/gb200_fake_inventory.py"
SHARDS = 64
# The small files of a Kimi-K2.6 checkout (contents are stand-ins; the mirror hashes them).
SMALL_FILES = {
    "config.json": json.dumps({"architectures": ["KimiK25ForConditionalGeneration"],
                               "model_type": "kimi_k25"}, indent=2) + "\n",
    "generation_config.json": json.dumps({"max_length": 262144}) + "\n",
    "tokenizer_config.json": json.dumps({"tokenizer_class": "TikTokenTokenizer"}) + "\n",
    "tiktoken.model": "stand-in for the tokenizer's BPE ranks\n",
    "chat_template.jinja": "{{ messages }}\n",
    "README.md": "# Kimi-K2.6 (tools/gb200-dry-run stand-in: sparse shards)\n",
}
MIRROR_START_S = 60
# Loaded by pyinfra after deploy.py (--commands): for the host it runs on, every operation with
# changes and the commands its generator yields. It adds no operation.
COMMANDS_DEPLOY = '''
import json
import os
from pathlib import Path

from pyinfra import host, state
from pyinfra.api import FileDownloadCommand, FileUploadCommand, FunctionCommand, StringCommand


def describe(command):
    if isinstance(command, StringCommand):
        return command.get_masked_value()
    if isinstance(command, FileUploadCommand):
        return f"upload {command.dest}"
    if isinstance(command, FileDownloadCommand):
        return f"download {command.src}"
    if isinstance(command, FunctionCommand):
        return f"call {command.function.__name__}"
    return str(command)


planned = {}
for op_hash in state.get_op_order():
    if op_hash not in state.ops[host]:
        continue
    op_data = state.get_op_data_for_host(host, op_hash)
    if op_data.operation_meta._maybe_is_change:
        name = ", ".join(sorted(state.get_op_meta(op_hash).names))
        planned[name] = [describe(command) for command in op_data.command_generator()]
folder = Path(os.environ["GB200_DRY_RUN_COMMANDS_DIR"])
(folder / f"{host.name.replace('/', '_')}.json").write_text(
    json.dumps({"host": host.name, "operations": planned}))
'''


def data_pairs(pyinfra_args: list[str]) -> list[str]:
    """The KEY=VALUE of each `--data` among pyinfra's arguments, as written."""
    pairs = [value for flag, value in zip(pyinfra_args, pyinfra_args[1:]) if flag == "--data"]
    return pairs + [arg.split("=", 1)[1] for arg in pyinfra_args if arg.startswith("--data=")]


def data_overrides(pyinfra_args: list[str]) -> dict:
    """The `--data KEY=VALUE` among pyinfra's arguments, parsed as pyinfra parses them: the
    repos served follow e.g. `--data model_profile=kimi-k2.6-nvfp4`."""
    from pyinfra_cli.util import parse_cli_arg

    return {key: parse_cli_arg(value) for key, _, value in
            (pair.partition("=") for pair in data_pairs(pyinfra_args))}


def fake_sha256(repo_id: str, path: str) -> str:
    """A stable stand-in checksum: the same repo gets the same commit on every run."""
    return hashlib.sha256(f"tools/gb200-dry-run {repo_id}/{path}".encode()).hexdigest()


def write_repo(root: Path, repo_id: str, total_bytes: int, shards: int, cache: dict) -> None:
    """A repo folder whose files add up to ``total_bytes``: the small files with content, the
    shards sparse (``truncate``), their checksums entered in the mirror's hash cache (keyed by
    resolved path, trusted while size and mtime are unchanged)."""
    root.mkdir(parents=True)
    small = 0
    for name, text in SMALL_FILES.items():
        (root / name).write_text(text)
        small += len(text.encode())
    names = [f"model-{index:05d}-of-{shards:06d}.safetensors" for index in range(1, shards + 1)]
    index = {"metadata": {"total_size": total_bytes - small},
             "weight_map": {f"layers.{i}.weight": name for i, name in enumerate(names)}}
    index_text = json.dumps(index, indent=2) + "\n"
    (root / "model.safetensors.index.json").write_text(index_text)
    small += len(index_text.encode())
    size, rest = divmod(total_bytes - small, shards)
    for number, name in enumerate(names):
        path = root / name
        with open(path, "wb") as handle:
            handle.truncate(size + (1 if number < rest else 0))
        stat = path.stat()
        cache[str(path.resolve())] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
                                      "sha256": fake_sha256(repo_id, name), "git_blob_id": None}


# What the seed's tray runs (Ubuntu 24.04 on Grace): the wheelhouses must be built for it.
TRAY_PLATFORM = "python=3.12 arch=aarch64"
# The wheelhouses a GB200 plan reads: (folder key, version key, pinned package, builder).
WHEELHOUSES = (("hf_cli_wheelhouse_dir", "hf_cli_version", "huggingface-hub", "hf-wheelhouse"),
               ("router_wheelhouse_dir", "router_version", "vllm-router", "router-wheelhouse"))


def stand_in_wheelhouse(work: Path, values: dict, folder_key: str, version_key: str,
                        package: str, builder: str) -> str | None:
    """A stand-in wheelhouse lock when the controller has not built one for the Grace hosts
    (`builder` --arch aarch64 --python-version 3.12): the preflight reads only its pin and
    platform, and a dry run uploads nothing. None too for keys of the wrong type: the
    preflight names them."""
    if not all(isinstance(values.get(key), str) for key in (folder_key, version_key)):
        return None
    folder = Path(values[folder_key])
    folder = folder if folder.is_absolute() else REPO / folder
    pin = f"{package}=={values[version_key]} "
    lock = folder / "requirements.lock"
    if lock.is_file():
        lines = lock.read_text().splitlines()
        if (lines and lines[0].endswith(TRAY_PLATFORM)
                and any(line.startswith(pin) for line in lines)):
            return None
    print(f"gb200-dry-run: no {package} wheelhouse for Grace in {folder}: planning with a "
          f"stand-in lock (build the real one with {builder} --arch aarch64 --python-version "
          f"3.12 --out {values[folder_key]})", file=sys.stderr)
    stand_in = work / builder
    stand_in.mkdir()
    (stand_in / "requirements.lock").write_text(
        f"# {package}=={values[version_key]} {TRAY_PLATFORM} (tools/gb200-dry-run stand-in)\n"
        f"{pin}--hash=sha256:{'0' * 64}  # {package.replace('-', '_')}-"
        f"{values[version_key]}-py3-none-any.whl\n")
    return str(stand_in)


def host_values(group: str, overrides: dict) -> dict:
    """The data of the production inventory's first host of `group` ({} when it has none):
    group data, its own, then --data."""
    hosts = runpy.run_path(str(REPO / "inventories" / "gb200.py")).get(group) or []
    if not hosts:
        return {}
    own_group = (group,) if (REPO / "group_data" / f"{group}.py").is_file() else ()
    return {**group_data(*own_group), **hosts[0][1], **overrides}


def served_repos(work: Path, values: dict, cache: dict) -> dict[str, Path]:
    """The repos the mirror serves, written under ``work``: the profile's and its EAGLE-3
    draft's (so that --data model_speculative=True plans the draft's fetch). No repo for data
    the preflight refuses (an unknown model_profile, a model_draft_repo that is no repo id):
    the dry run goes on, and the preflight names the key as the deploy would."""
    from tasks.models import PROFILES
    from tasks.data_keys import HUB_REPO_ID

    name = values.get("model_profile")
    profile = PROFILES.get(name) if isinstance(name, str) else None
    if profile is None:
        return {}
    repos = {profile.repo: work / "repos" / profile.repo}
    write_repo(repos[profile.repo], profile.repo, profile.size_bytes, SHARDS, cache)
    draft = values.get("model_draft_repo")
    if (profile.draft_local_name and isinstance(draft, str) and HUB_REPO_ID.match(draft)
            and draft not in repos):
        repos[draft] = work / "repos" / draft
        write_repo(repos[draft], draft, 3 * 10**9, 1, cache)
    return repos


def run_pyinfra(command: list[str], env: dict,
                stdout=None) -> tuple[int, list[str], str | None]:
    """pyinfra's exit status, the problems its preflight logged (`preflight: LINE`), its log
    passed on to stderr as it comes, and its stdout when `stdout` is subprocess.PIPE."""
    process = subprocess.Popen(command, cwd=REPO, env=env, stdin=subprocess.DEVNULL,
                               stdout=stdout, stderr=subprocess.PIPE, text=True)
    problems = []
    captured = [] if stdout is not None else None
    if captured is not None:
        # Read stdout beside stderr, so neither pipe fills while the other is read.
        reader = threading.Thread(target=lambda: captured.append(process.stdout.read()))
        reader.start()
    for line in process.stderr:
        sys.stderr.write(line)
        _, marker, problem = line.partition("preflight: ")
        if marker:
            problems.append(problem.strip())
    code = process.wait()
    if captured is not None:
        reader.join()
        return code, problems, "".join(captured)
    return code, problems, None


def print_rollout(plan_json: str, command: list[str], env: dict) -> int:
    """The roll-out (tools/rollout.py) the plan asks for: which trays restart vLLM, in which
    batches, out of which routers; 1 when it cannot be planned."""
    from tasks.data_keys import DataError
    from tools import rollout
    from tools.drift_check import inventory_hosts

    try:
        hosts = inventory_hosts(FAKE_INVENTORY, data_pairs(command), env)
        plan = rollout.plan_of(json.loads(plan_json), hosts, None)
    except (DataError, RuntimeError, ValueError) as error:
        print(f"gb200-dry-run: no roll-out: {error}", file=sys.stderr)
        return 1
    print("\n".join(plan.describe()))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runtime", choices=("docker", "kubernetes"))
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--commands", type=Path, metavar="FILE")
    parser.add_argument("--rollout", action="store_true")
    args, pyinfra_args = parser.parse_known_args(argv)
    if args.rollout and args.json:
        parser.error("--rollout prints the roll-out instead of the plan: not with --json")
    missing = missing_packages("gb200-dry-run", "pyinfra")
    if missing:
        sys.exit(missing)

    overrides = data_overrides(pyinfra_args)
    values = {**group_data("gb200"), **overrides}
    work = Path(tempfile.mkdtemp(prefix="gb200-dry-run-"))
    mirror = None
    try:
        cache: dict = {}
        repos = served_repos(work, values, cache)
        command = [venv_command("pyinfra"), FAKE_INVENTORY, "deploy.py", "--dry"]
        if repos:
            (work / "hash-cache.json").write_text(json.dumps(cache))
            mirror, url = hub_mirror.launch(work, repos, hash_cache=work / "hash-cache.json",
                                            who="gb200-dry-run",
                                            start_timeout_s=MIRROR_START_S)
            command += ["--data", f"weights_hf_endpoint={url}"]
        for keys, group_values in zip(WHEELHOUSES, (values, host_values("router", overrides))):
            wheelhouse = stand_in_wheelhouse(work, group_values, *keys)
            if wheelhouse:
                command += ["--data", f"{keys[0]}={wheelhouse}"]
        if args.json or args.rollout:
            command.append("--json")
        if args.commands:
            (work / "commands").mkdir()
            (work / "commands.py").write_text(COMMANDS_DEPLOY)
            command.insert(3, str(work / "commands.py"))
        env = dict(os.environ)
        env.pop("GB200_FAKE_RUNTIME", None)
        if args.runtime:
            env["GB200_FAKE_RUNTIME"] = args.runtime
        # The metadata request goes to 127.0.0.1: never through a proxy, never refused as
        # offline.
        env["NO_PROXY"] = ",".join(filter(None, [env.get("NO_PROXY"), "127.0.0.1"]))
        env["no_proxy"] = env["NO_PROXY"]
        env.pop("HF_HUB_OFFLINE", None)
        if args.commands:
            env["GB200_DRY_RUN_COMMANDS_DIR"] = str(work / "commands")
        returncode, problems, plan_json = run_pyinfra(
            command + pyinfra_args, env, subprocess.PIPE if args.rollout else None)
        if args.rollout and returncode == 0 and not problems:
            returncode = print_rollout(plan_json, command + pyinfra_args, env)
        if args.commands:
            hosts = [json.loads(path.read_text())
                     for path in sorted((work / "commands").glob("*.json"))]
            args.commands.write_text(json.dumps(
                {entry["host"]: entry["operations"] for entry in hosts}, indent=1) + "\n")
        if problems:
            print("gb200-dry-run: the preflight refuses the deploy (a real run stops before any "
                  "change):\n" + "\n".join(problems), file=sys.stderr)
            return returncode or 1
        return returncode
    finally:
        if mirror is not None:
            hub_mirror.stop(mirror)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
