"""The weights filesystem, the model tree and the secrets file, as deployed."""

import json

import pytest

from tasks.facts import FreeBytes
from tasks.settings import ENV_FILE
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


def test_secrets_file_is_root_owned_and_private(unit_host):
    env_file = unit_host.file(ENV_FILE)
    assert env_file.exists
    assert (env_file.user, env_file.group, env_file.mode) == ("root", "root", 0o600)
