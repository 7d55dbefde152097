"""Custom pyinfra facts: small, read-only questions asked of a host.

Every command here exits 0 on a host that lacks the tool it asks, so pyinfra never marks the host
failed for a question; the fact is then empty (``[]`` or ``{}``), and a preflight can say so.
"""

from __future__ import annotations

import json
import re
import shlex
from xml.etree import ElementTree

from pyinfra.api import FactBase, QuoteString, StringCommand
from pyinfra.facts.server import Command

from tasks.weights_job import (CLIENT_RECORDS_DIR, INCOMPLETE_GLOB, JOB_FILE, MANIFEST,
                               RECORDS_DIR)

# nvidia-smi prints "[N/A]", "[Not Supported]" or "[Insufficient Permissions]" (in -q -x: "N/A")
# where a board has no such value; a number or a flag it cannot give is unknown, not zero or off.
_UNAVAILABLE = ("N/A", "[N/A]")


def _unavailable(value: str) -> bool:
    return value in _UNAVAILABLE or value.startswith("[")


class TreeDigests(FactBase):
    """The sha256 of every file under a directory, by path relative to it.

    .. code:: python

        {"config.json": "9f2c...", "model-00001-of-00002.safetensors": "41ab..."}

    An absent directory yields ``{}``. Meant for small trees (a tiny model, a config folder):
    it reads every byte, so a 595 GB weights tree has its own completeness check (WeightsTree).
    """

    def command(self, path: str) -> StringCommand:
        return StringCommand(
            "cd", QuoteString(path), "2>/dev/null", "&&",
            "find . -type f -print0 | sort -z | xargs -0r sha256sum", "||", "true",
        )

    def process(self, output: list[str]) -> dict[str, str]:
        digests = {}
        for line in output:
            digest, _, name = line.partition("  ")
            digests[name.removeprefix("./")] = digest
        return digests

    @staticmethod
    def default() -> dict[str, str]:
        return {}


_WEIGHTS_TREE_MARK = "::weights-tree::"


def marked_sections(output: list[str], mark: str) -> dict[str, list[str]]:
    """The lines after each line that starts with ``mark``, by the name that follows it (a
    fact that asks several questions in one command prints such a line before each answer)."""
    sections: dict[str, list[str]] = {}
    current = None
    for line in output:
        if line.startswith(mark):
            current = line[len(mark):]
            sections[current] = []
        elif current:
            sections[current].append(line)
    return sections


class WeightsTree(FactBase):
    """A weights folder as the Hub fetch left it: its manifest, every file's size and mtime
    (outside the downloaders' records), the bytes of orphaned ``.incomplete`` files, and
    whether its fetch unit is running (and the sha256 of its job). tasks/weights_job.py names
    the files; tasks.weights.Target gives ``state_dir`` and ``unit``.

    .. code:: python

        {"manifest": {"repo": "moonshotai/Kimi-K2.6", "commit": "3f1c...", "complete": True,
                      "files": {"model-00001-of-000064.safetensors": {"size": 9.9e9, ...}}},
         "files": {"model-00001-of-000064.safetensors": [9932891234, 1764413012123456789]},
         "incomplete_bytes": 0, "unit_active": False, "job_sha256": "9e1d..."}

    Reads sizes and mtimes only, never content: a complete 595 GB tree is recognised in well
    under a second. An absent folder yields empty values.
    """

    def command(self, path: str, state_dir: str, unit: str) -> StringCommand:
        mark = _WEIGHTS_TREE_MARK
        return StringCommand(
            "echo", f"{mark}manifest;", "cat", QuoteString(f"{path}/{MANIFEST}"), "2>/dev/null;",
            "echo;", "echo", f"{mark}files;",
            "find", QuoteString(path), "-path", QuoteString(f"{path}/{RECORDS_DIR}"), "-prune",
            "-o", "-type", "f", "-printf", QuoteString("%P\\t%s\\t%T@\\n"), "2>/dev/null;",
            "echo", f"{mark}incomplete;",
            "find", QuoteString(f"{path}/{CLIENT_RECORDS_DIR}"), "-name",
            QuoteString(INCOMPLETE_GLOB), "-type", "f", "-printf", "'%s\\n'", "2>/dev/null;",
            "echo", f"{mark}unit;", "systemctl", "is-active", unit, "2>/dev/null;",
            "echo", f"{mark}job;", "sha256sum", QuoteString(f"{state_dir}/{JOB_FILE}"),
            "2>/dev/null;", "true",
        )

    def process(self, output: list[str]) -> dict:
        sections = self._sections(output)
        try:
            manifest = json.loads("\n".join(sections.get("manifest", [])) or "null")
        except ValueError:
            manifest = None
        present = {}
        for line in sections.get("files", []):
            parts = line.split("\t")
            if len(parts) == 3 and parts[1].isdigit():
                present[parts[0]] = [int(parts[1]), mtime_ns(parts[2])]
        job = sections.get("job", [""])
        return {
            "manifest": manifest if isinstance(manifest, dict) else None,
            "files": present,
            "incomplete_bytes": sum(int(n) for n in sections.get("incomplete", []) if n.isdigit()),
            "unit_active": sections.get("unit", [""])[:1] in (["active"], ["activating"]),
            "job_sha256": job[0].split()[0] if job and job[0] else None,
        }

    @staticmethod
    def _sections(output: list[str]) -> dict[str, list[str]]:
        return marked_sections(output, _WEIGHTS_TREE_MARK)

    @staticmethod
    def default() -> dict:
        return {"manifest": None, "files": {}, "incomplete_bytes": 0, "unit_active": False,
                "job_sha256": None}


def mtime_ns(text: str) -> int:
    """find's %T@ ("1764413012.1234567890") as st_mtime_ns, exactly (no float rounding)."""
    seconds, _, fraction = text.partition(".")
    return int(seconds) * 10**9 + int((fraction + "000000000")[:9])


class NvidiaGpus(FactBase):
    """One dict per GPU that ``nvidia-smi`` lists, in its index order.

    .. code:: python

        [{"index": 0, "uuid": "GPU-68689df7-b80a-f728-c0b2-0efdfa468678", "name": "NVIDIA H200",
          "bus_id": "00000000:00:06.0", "driver": "580.159.04", "memory_total_mib": 143771,
          "memory_used_mib": 0, "mig": False, "persistence": True}]

    ``mig`` is ``None`` on boards without MIG; a memory figure the board cannot report is
    ``None``. No nvidia-smi, or one that cannot reach the driver (it prints its complaint on
    stdout), yields ``[]``.
    """

    FIELDS = ("index", "uuid", "name", "pci.bus_id", "driver_version", "memory.total",
              "memory.used", "mig.mode.current", "persistence_mode")

    def command(self) -> str:
        query = ",".join(self.FIELDS)
        return (f"command -v nvidia-smi >/dev/null && "
                f"nvidia-smi --query-gpu={query} --format=csv,noheader,nounits || true")

    def process(self, output: list[str]) -> list[dict]:
        gpus = []
        for line in output:
            fields = [field.strip() for field in line.split(",")]
            if len(fields) != len(self.FIELDS) or not fields[0].isdigit():
                continue
            index, uuid, name, bus_id, driver, total, used, mig, persistence = fields
            gpus.append({
                "index": int(index),
                "uuid": uuid,
                "name": name,
                "bus_id": bus_id,
                "driver": driver,
                "memory_total_mib": None if _unavailable(total) else int(total),
                "memory_used_mib": None if _unavailable(used) else int(used),
                "mig": None if _unavailable(mig) else mig == "Enabled",
                "persistence": persistence == "Enabled",
            })
        return gpus

    @staticmethod
    def default() -> list[dict]:
        return []


class NvidiaSmiInfo(FactBase):
    """Driver and CUDA versions and, per GPU, its NVLink fabric registration (``nvidia-smi -q -x``).

    .. code:: python

        {"driver_version": "580.159.04", "cuda_version": "13.0",
         "gpus": [{"bus_id": "00000008:01:00.0", "product_name": "NVIDIA GB200",
                   "fabric_state": "Completed", "fabric_status": "Success",
                   "clique_id": "32766", "cluster_uuid": "5c0f2b9e-..."}]}

    A GB200 tray is ready for multi-GPU work once every GPU's fabric state reads ``Completed``;
    PCIe boards (an H200 NVL) say ``"N/A"``, kept as is; a driver too old to report the fabric
    gives ``None``. No nvidia-smi, or output that is not its XML, yields ``{}``.
    """

    GPU_FIELDS = {
        "product_name": "product_name",
        "fabric_state": "fabric/state",
        "fabric_status": "fabric/status",
        "clique_id": "fabric/cliqueId",
        "cluster_uuid": "fabric/clusterUuid",
    }

    def command(self) -> str:
        return "command -v nvidia-smi >/dev/null && nvidia-smi -q -x || true"

    def process(self, output: list[str]) -> dict:
        # Most of the document is per-GPU clock tables nobody here reads: pull-parse it and drop
        # each <gpu> subtree once its few fields are out, so memory stays at one GPU's worth.
        parser = ElementTree.XMLPullParser(events=("start", "end"))
        info: dict = {"driver_version": None, "cuda_version": None, "gpus": []}
        depth = 0
        try:
            for line in output:
                parser.feed(line + "\n")
                for event, element in parser.read_events():
                    if event == "start":
                        depth += 1
                        continue
                    depth -= 1
                    if depth == 1 and element.tag in ("driver_version", "cuda_version"):
                        info[element.tag] = (element.text or "").strip()
                    elif depth == 1 and element.tag == "gpu":
                        info["gpus"].append(self._gpu(element))
                        element.clear()
            parser.close()
        except ElementTree.ParseError:
            return {}
        if info["driver_version"] is None:
            return {}
        return info

    def _gpu(self, element: ElementTree.Element) -> dict:
        gpu = {"bus_id": element.get("id")}
        for key, path in self.GPU_FIELDS.items():
            found = element.find(path)
            gpu[key] = None if found is None else (found.text or "").strip()
        return gpu

    @staticmethod
    def default() -> dict:
        return {}


_MODULE_VERSION = re.compile(r"Kernel Module\b.*?\s(\d+\.\d+(?:\.\d+)*)(?=\s|$)")


class NvidiaKernelModuleVersion(FactBase):
    """The version of the NVIDIA kernel module loaded now, from ``/proc/driver/nvidia/version``.

    .. code:: python

        "580.95.05"

    ``None`` when no NVIDIA module is loaded. After a driver install it names the old driver
    until the host reboots.
    """

    def command(self) -> str:
        return "cat /proc/driver/nvidia/version 2>/dev/null || true"

    def process(self, output: list[str]) -> str | None:
        for line in output:
            match = _MODULE_VERSION.search(line)
            if match:
                return match[1]
        return None


class CdiSpecDriverVersion(FactBase):
    """The driver version a CDI spec was generated for: that of the ``libcuda.so.<version>`` it
    mounts into containers.

    .. code:: python

        "580.95.05"

    ``None`` when the spec is absent or mounts no versioned libcuda. (The spec also names
    ``libcuda.so.1`` in its symlink hook, which the pattern skips: it needs two dots.)
    """

    def command(self, path: str) -> StringCommand:
        return StringCommand("grep", "-oE", "-m1", "'libcuda[.]so[.][0-9]+[.][0-9.]+'",
                             QuoteString(path), "2>/dev/null", "||", "true")

    def process(self, output: list[str]) -> str | None:
        return output[0].strip().removeprefix("libcuda.so.").rstrip(".") if output else None


class NvidiaPciGpus(FactBase):
    """The PCI addresses of the host's NVIDIA GPUs (vendor 0x10de, a display-class device),
    read from sysfs: whether the host has GPUs at all, driver or no driver. What the host is,
    not what the model needs: the NVIDIA layer (toolkit, CDI, persistence) and the GPU checks
    follow it; NVSwitches (a bridge class) are not GPUs.

    .. code:: python

        ["0008:01:00.0", "0009:01:00.0", "0018:01:00.0", "0019:01:00.0"]
    """

    def command(self) -> str:
        return ('for device in /sys/bus/pci/devices/*; do '
                '[ "$(cat "$device/vendor" 2>/dev/null)" = 0x10de ] || continue; '
                'case "$(cat "$device/class" 2>/dev/null)" in 0x03*) echo "${device##*/}";; '
                'esac; done; true')

    def process(self, output: list[str]) -> list[str]:
        return sorted(line.strip() for line in output if line.strip())

    @staticmethod
    def default() -> list[str]:
        return []


class CpuArchitecture(FactBase):
    """The machine hardware name from ``uname -m``: which wheels and images the host can run.

    .. code:: python

        "aarch64"
    """

    def command(self) -> str:
        return "uname -m"

    def process(self, output: list[str]) -> str | None:
        return output[0].strip() if output else None


class FreeBytes(FactBase):
    """Free and total bytes of the filesystem that holds ``path``, or would hold it once created.

    .. code:: python

        {"path": "/raid", "mount": "/raid", "free_bytes": 3840755982336,
         "total_bytes": 7681511964672}

    A path that does not exist yet is measured at its nearest existing parent, named in
    ``path``, because that is where its bytes will land. ``free_bytes`` is what an unprivileged
    writer gets (df's "Available", net of the root reserve). ``{}`` if df fails.
    """

    def command(self, path: str) -> StringCommand:
        return StringCommand(
            "p=", QuoteString(path), "; ",
            'while [ ! -e "$p" ]; do p=$(dirname -- "$p"); done; ',
            "printf '%s\\n' \"$p\"; ",
            'df -P -B1 -- "$p" 2>/dev/null || true',
            _separator="",
        )

    def process(self, output: list[str]) -> dict:
        if len(output) < 3:
            return {}
        # -P keeps each filesystem on one line; the mount point is the rest of it (spaces kept).
        fields = output[-1].split(None, 5)
        if len(fields) < 6 or not (fields[1].isdigit() and fields[3].isdigit()):
            return {}
        return {
            "path": output[0],
            "mount": fields[5],
            "free_bytes": int(fields[3]),
            "total_bytes": int(fields[1]),
        }

    @staticmethod
    def default() -> dict:
        return {}


_SS_OWNER = re.compile(r'users:\(\("(?P<name>[^"]*)",pid=(?P<pid>\d+)')


class ListeningTcpPorts(FactBase):
    """Listening TCP sockets from ``ss -Htlnp``, one dict each, in ss's order.

    .. code:: python

        [{"address": "0.0.0.0", "port": 8000, "process": "vllm", "pid": 4242},
         {"address": "::", "port": 22, "process": None, "pid": None}]

    ``address`` is as ss prints it without IPv6 brackets (``"*"`` means every address, a
    ``%lo`` suffix names the interface). Without root, ss cannot see other users' processes:
    those sockets have ``process`` and ``pid`` ``None``. No ss yields ``[]``.
    """

    def command(self) -> str:
        return "command -v ss >/dev/null && ss -Htlnp || true"

    def process(self, output: list[str]) -> list[dict]:
        sockets = []
        for line in output:
            fields = line.split()
            # ss drops its State column when a filter selects a single state (-l selects two);
            # accept lines with or without it.
            if fields and not fields[0].isdigit():
                fields = fields[1:]
            if len(fields) < 4:
                continue
            address, colon, port = fields[2].rpartition(":")
            if not colon or not port.isdigit():
                continue
            if address.startswith("[") and address.endswith("]"):
                address = address[1:-1]
            owner = _SS_OWNER.search(line)
            sockets.append({
                "address": address,
                "port": int(port),
                "process": owner["name"] if owner else None,
                "pid": int(owner["pid"]) if owner else None,
            })
        return sockets

    @staticmethod
    def default() -> list[dict]:
        return []


class DockerImage(FactBase):
    """The image a reference names in the host's Docker: its ID, OS and CPU architecture.

    .. code:: python

        {"id": "sha256:3f1c...", "os": "linux", "architecture": "arm64"}

    ``None`` when Docker lacks the image, is not installed, or is not running (a first deploy
    asks before it starts Docker).
    """

    def command(self, reference: str) -> StringCommand:
        return StringCommand("docker", "image", "inspect", "--format",
                             QuoteString("{{.Id}} {{.Os}} {{.Architecture}}"),
                             QuoteString(reference), "2>/dev/null", "||", "true")

    def process(self, output: list[str]) -> dict | None:
        words = output[0].split() if output else []
        if len(words) != 3 or not words[0].startswith("sha256:"):
            return None
        return {"id": words[0], "os": words[1], "architecture": words[2]}


class SystemdVersion(FactBase):
    """The major version of the host's systemd: which unit settings it understands.

    .. code:: python

        255
    """

    def command(self) -> str:
        return "systemctl --version 2>/dev/null | head -n 1 || true"

    def process(self, output: list[str]) -> int | None:
        match = re.match(r"systemd (\d+)", output[0]) if output else None
        return int(match[1]) if match else None


class DebPackagesInstalled(FactBase):
    """Which of ``packages`` dpkg has installed, and their versions. Asked by name: a tray
    with thousands of packages prints these lines only (pyinfra's DebPackages lists every
    package, and the controller reads each line).

    .. code:: python

        {"curl": "7.88.1-10+deb12u5"}

    Installed is what DebPackages counts (dpkg's ``ii`` or ``hi``); a name dpkg does not know,
    or knows only as removed or half-installed, is absent. ``{}`` without dpkg-query.
    """

    def command(self, packages: list[str]) -> StringCommand:
        return StringCommand("dpkg-query", "-W", "-f",
                             QuoteString(r"${db:Status-Abbrev}\t${Package}\t${Version}\n"),
                             "--", *[QuoteString(name) for name in packages],
                             "2>/dev/null", "|| true")

    @staticmethod
    def default() -> dict[str, str]:
        return {}

    def process(self, output: list[str]) -> dict[str, str]:
        installed = {}
        for line in output:
            status, _, rest = line.partition("\t")
            name, _, version = rest.partition("\t")
            if status[:2] in ("ii", "hi") and name and version:
                installed[name] = version
        return installed


class PythonVersion(FactBase):
    """The major.minor version of the host's ``python3``: which wheels it can install.

    .. code:: python

        "3.12"

    ``None`` without a python3.
    """

    def command(self) -> str:
        # The version in the file name python3 resolves to (Debian's and Ubuntu's python3 is a
        # link to python3.N): no interpreter started. Otherwise asked of python3 itself, with
        # -I -S: no site-packages read nor environment.
        return ('p=$(command -v python3) && p=$(readlink -f -- "$p") && case "${p##*/}" in '
                'python3.[0-9]|python3.[0-9][0-9]) echo "${p##*/python}" ;; '
                "*) python3 -I -S -c 'import sys; print(\"%d.%d\" % sys.version_info[:2])' ;; "
                "esac 2>/dev/null || true")

    def process(self, output: list[str]) -> str | None:
        return output[0].strip() if output and re.fullmatch(r"\d+\.\d+", output[0].strip()) \
            else None


class PreflightState(FactBase):
    """What the preflight reads of a host, asked in one command rather than six: each answer is
    what its own fact makes of the same command's output.

    .. code:: python

        {"service_pid": "4242",        # Command: systemctl show -p MainPID --value UNIT
         "model_bytes": "1234567",     # Command: du -sb MODEL_DIR | cut -f1
         "python": "3.12",             # PythonVersion
         "weights_free": {...},        # FreeBytes(WEIGHTS_DIR)
         "listening": [...],           # ListeningTcpPorts
         "arch": "x86_64"}             # CpuArchitecture

    An answer whose command printed nothing is its fact's default, as pyinfra hands it out.
    ``uname -m`` runs last and gives the command its exit status, so a host that cannot say
    its CPU fails as it did when CpuArchitecture was asked alone.
    """

    # Section -> the fact whose process() and default() read it; the command's order.
    FACTS = {"service_pid": Command, "model_bytes": Command, "python": PythonVersion,
             "weights_free": FreeBytes, "listening": ListeningTcpPorts, "arch": CpuArchitecture}
    # Printed on a line of its own, after an empty one, before each section.
    MARK = "::preflight-state::"

    def command(self, unit: str, model_dir: str, weights_dir: str) -> str:
        commands = {
            "service_pid": f"systemctl show -p MainPID --value {shlex.quote(unit)} 2>/dev/null "
                           "|| true",
            "model_bytes": f"du -sb {shlex.quote(model_dir)} 2>/dev/null | cut -f1 || true",
            "python": PythonVersion().command(),
            "weights_free": FreeBytes().command(weights_dir).get_raw_value(),
            "listening": ListeningTcpPorts().command(),
            "arch": CpuArchitecture().command(),
        }
        return "; ".join(f"printf '\\n%s\\n' {self.MARK}{name}; {commands[name]}"
                         for name in self.FACTS)

    def process(self, output: list[str]) -> dict:
        sections = self._sections(output)
        return {name: fact().process(sections[name]) if sections.get(name) else fact.default()
                for name, fact in self.FACTS.items()}

    @classmethod
    def _sections(cls, output: list[str]) -> dict[str, list[str]]:
        """The lines of each section, as its command alone would have printed them: the empty
        line the next mark's printf starts with is not the section's (a section ending without
        a newline has none to lose)."""
        sections = marked_sections(output, cls.MARK)
        for lines in list(sections.values())[:-1]:
            if lines[-1:] == [""]:
                lines.pop()
        return sections

    @classmethod
    def output_of(cls, answers: dict[str, list[str]]) -> list[str]:
        """The lines the command prints on a host whose separate commands print ``answers``
        (section -> lines; a missing section printed nothing): for @fake hosts."""
        return [line for name in cls.FACTS
                for line in ("", f"{cls.MARK}{name}", *answers.get(name, []))]

    @classmethod
    def default(cls) -> dict:
        return {name: fact.default() for name, fact in cls.FACTS.items()}


class KubernetesObjectsDiffer(FactBase):
    """Whether the cluster's live objects differ from object files: the exit status of
    ``kubectl diff --server-side`` (its output, which would show the objects, is dropped).

    .. code:: python

        True    # differ (exit 1): someone edited, scaled or deleted an object
        False   # the same (exit 0)
        None    # cannot tell (no files yet, no cluster access: exit > 1)
    """

    def command(self, kubectl: list[str], namespace: str, field_manager: str,
                files: list[str]) -> StringCommand:
        arguments = [*kubectl, "diff", "--server-side", "--force-conflicts",
                     f"--field-manager={field_manager}", "-n", namespace]
        for path in files:
            arguments += ["-f", path]
        return StringCommand(*(QuoteString(argument) for argument in arguments),
                             ">/dev/null", "2>&1;", "echo", "$?")

    def process(self, output: list[str]) -> bool | None:
        status = output[-1].strip() if output else ""
        return {"0": False, "1": True}.get(status)


# Where an administrator's drop-ins live: `systemctl edit` and files written by hand
# (/etc/systemd/system), runtime ones (/run/systemd/system), and `systemctl set-property`
# (system.control). Vendor drop-ins (/usr/lib/systemd, /lib/systemd: Ubuntu ships
# service.d/10-timeout-abort.conf) and generated ones are the distribution's, not local edits.
ADMIN_DROP_IN_DIRS = ("/etc/systemd/system.control", "/run/systemd/system.control",
                      "/etc/systemd/system", "/run/systemd/system")


class SystemdDropIns(FactBase):
    """The administrator's drop-ins that apply to a unit: those systemd has loaded
    (``systemctl show -p DropInPaths``) and those written since the last daemon-reload, in the
    unit's own ``.d`` folders of ADMIN_DROP_IN_DIRS.

    .. code:: python

        ["/etc/systemd/system.control/vllm.service.d/50-CPUQuota.conf",
         "/etc/systemd/system/service.d/restart.conf",
         "/etc/systemd/system/vllm.service.d/override.conf"]

    Drop-ins for every service (``service.d``) are listed too: they change what runs as well.
    No systemd, or no drop-in, yields ``[]``.
    """

    def command(self, unit: str) -> StringCommand:
        folders = " ".join(f"{folder}/{unit}.d" for folder in ADMIN_DROP_IN_DIRS)
        return StringCommand(
            "systemctl", "show", "-p", "DropInPaths", "--value", QuoteString(unit),
            "2>/dev/null;", "for d in", folders + ";", "do",
            'ls -1d "$d"/*.conf 2>/dev/null;', "done;", "true")

    def process(self, output: list[str]) -> list[str]:
        paths = {path for line in output for path in line.split()}
        return sorted(path for path in paths
                      if path.startswith(tuple(f"{folder}/" for folder in ADMIN_DROP_IN_DIRS)))

    @staticmethod
    def default() -> list[str]:
        return []
