"""The weights filesystem, the model tree and the secrets file, as deployed."""

import json
import time
from pathlib import Path

import pytest

from tasks.facts import FreeBytes, WeightsTree
from tasks.operations import undeclared_files
from tasks.settings import ENV_FILE
from tasks.weights import Target
from tests.helpers import run_fact


def test_weights_filesystem_is_mounted_with_room_to_spare(host, host_data, settings):
    free = run_fact(host, FreeBytes, settings.weights_dir)
    assert free["path"] == settings.weights_dir, f"{settings.weights_dir} does not exist"
    assert host.mount_point(free["mount"]).exists
    assert free["free_bytes"] >= host_data["weights_min_free_bytes"], \
        f"{free['free_bytes'] / 1e9:.1f} GB free on {free['mount']}"


def test_model_tree_is_complete(host, settings):
    model = host.file(settings.model_dir)
    assert model.is_directory, f"{settings.model_dir} is missing"
    assert host.file(f"{settings.model_dir}/config.json").is_file
    index = host.file(f"{settings.model_dir}/model.safetensors.index.json")
    if not index.exists:
        pytest.skip("single-file checkpoint: no shard index to check against")
    shards = sorted(set(json.loads(index.content_string)["weight_map"].values()))
    missing = [shard for shard in shards
               if not host.file(f"{settings.model_dir}/{shard}").exists
               or host.file(f"{settings.model_dir}/{shard}").size == 0]
    assert missing == []


def declared_files(host, settings, folder: str) -> tuple[set[str] | None, dict]:
    """(the files the deploy declares for a weights folder, what the folder holds): the
    controller's copy on the push path, else the Hub listing the fetch verified (its
    manifest); None when there is no complete record to compare with."""
    target = Target("model", "", "", folder)  # its state folder and unit follow the folder
    tree = run_fact(host, WeightsTree, folder, target.state_dir, target.unit)
    if settings.model_source_dir and folder == settings.model_dir:
        source = Path(settings.model_source_dir)
        return {path.relative_to(source).as_posix() for path in source.rglob("*")
                if path.is_file()}, tree
    manifest = tree["manifest"] or {}
    return (set(manifest.get("files") or {}) if manifest.get("complete") else None), tree


def test_weights_folders_hold_only_declared_files(host, settings):
    """vLLM reads the whole folder: a file nobody declared (a stray shard, a
    chat_template.jinja) changes what runs. The deploy removes such files (and restarts vLLM);
    until it runs, this check names them. The downloader's records under .cache/ are not
    counted."""
    checked = 0
    for folder in filter(None, (settings.model_dir, settings.draft_dir)):
        declared, tree = declared_files(host, settings, folder)
        if declared is None:
            continue
        checked += 1
        extra = undeclared_files(tree["files"], declared)
        assert not extra, f"{folder} holds files the deploy did not place: {', '.join(extra)}"
    if not checked:
        pytest.skip("no complete weights folder yet (see test_model_tree_is_complete)")


def test_the_scheduled_verify_found_no_corrupt_weights_or_a_deploy_replaced_them(host, settings):
    """Bit rot keeps a file's size and mtime, which is all a deploy or the drift check's plan
    reads of a Hub-fetched folder. The scheduled deep verify (weights-verify-*.timer,
    weights_verify_schedule) re-hashes every file; what it finds missing or corrupt is named
    here until a deploy has fetched it again (the manifest is complete once more)."""
    if settings.model_source_dir:
        pytest.skip("pushed from the controller: every deploy and drift check compares sha256")
    checked = 0
    for folder in filter(None, (settings.model_dir, settings.draft_dir)):
        target = Target("model", "", "", folder)
        audit = host.file(target.audit_file)
        if not audit.exists:
            continue
        checked += 1
        found = json.loads(audit.content_string)
        bad = {key: found.get(key) for key in ("missing", "corrupt") if found.get(key)}
        manifest = run_fact(host, WeightsTree, folder, target.state_dir, target.unit)["manifest"]
        when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(found.get("finished", 0)))
        named = "; ".join(f"{key}: {', '.join(paths)}" for key, paths in bad.items())
        assert not bad or (manifest or {}).get("complete"), (
            f"the scheduled verify of {folder} at {when} found {named}: the next deploy "
            "fetches them again")
    if not checked:
        pytest.skip("no scheduled verify has run on this host yet")


def test_secrets_file_is_root_owned_and_private(unit_host):
    env_file = unit_host.file(ENV_FILE)
    assert env_file.exists
    assert (env_file.user, env_file.group, env_file.mode) == ("root", "root", 0o600)
