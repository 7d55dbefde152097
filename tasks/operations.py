"""Custom pyinfra operations: each reads facts and yields only the commands that close the gap."""

from __future__ import annotations

import hashlib
import io
import posixpath
import shlex
from collections.abc import Container, Iterable
from pathlib import Path

from pyinfra import host
from pyinfra.api import FileUploadCommand, QuoteString, StringCommand, operation
from pyinfra.api.exceptions import OperationValueError
from pyinfra.facts.files import File, Link, Sha1File, Sha256File

from tasks.facts import DockerImage, SystemdDropIns, TreeDigests
from tasks.weights_job import RECORDS_DIR
from tools.repository import file_sha256


def local_tree_digests(src: Path) -> dict[str, str]:
    return {str(path.relative_to(src)): file_sha256(path)
            for path in sorted(src.rglob("*")) if path.is_file()}


# Where a downloader keeps its own records inside a weights folder (the Hub fetch's manifest,
# the hf client's resume metadata): never declared, never removed as undeclared.
DOWNLOADER_RECORDS = f"{RECORDS_DIR}/"
# The suffix of an image archive while docker_image_present pushes and loads it.
STAGED = ".staged"
# Written into a venv by wheelhouse_venv_installed once its install ended: a venv without it
# is a build that was cut short.
VENV_COMPLETE = ".deploy-complete"


def undeclared_files(present: Iterable[str], declared: Container[str]) -> list[str]:
    """The files of a weights folder (paths relative to it) that nobody declared, outside
    DOWNLOADER_RECORDS. vLLM reads the whole folder: a stray shard, a chat_template.jinja or
    a config left there changes what runs, so the deploy removes them (a restart follows) and
    the infra checks report them."""
    return sorted(path for path in present
                  if path not in declared and not path.startswith(DOWNLOADER_RECORDS))


@operation()
def tree_synced(src: str, dest: str):
    """
    Make a host directory hold the files of a controller directory, byte for byte.

    + src: directory on the controller
    + dest: directory on the host

    Each missing or different file is uploaded beside its destination and renamed into place,
    so a reader never sees half a file. Files only on the host are removed (undeclared_files),
    except under DOWNLOADER_RECORDS (a folder once fetched from the Hub keeps its records).

    **Example:**

    .. code:: python

        tree_synced(name="Place tiny model", src=".cache/tiny-model", dest="/raid/models/tiny")
    """
    if not Path(src).is_dir():
        # An absent source would read as an empty tree, and every file on the host is extra.
        raise OperationValueError(f"tree_synced: {src} is no folder on the controller; "
                                  f"refusing to empty {dest}")
    wanted = local_tree_digests(Path(src))
    present = host.get_fact(TreeDigests, path=dest)
    stale = [name for name, digest in wanted.items() if present.get(name) != digest]
    extra = undeclared_files(present, wanted)
    if not stale and not extra:
        host.noop(f"{dest} holds the {len(wanted)} files of {src}")
        return
    if extra:
        yield StringCommand("rm", "-f", "--", *(QuoteString(f"{dest}/{name}") for name in extra))
    if not stale:
        return
    folders = sorted({str(Path(dest, name).parent) for name in stale})
    yield StringCommand("mkdir", "-p", *(QuoteString(folder) for folder in folders))
    for name in stale:
        target = f"{dest}/{name}"
        partial = f"{Path(target).parent}/.{Path(target).name}.partial"
        yield FileUploadCommand(str(Path(src, name)), partial)
        yield StringCommand("chmod", "0644", QuoteString(partial), "&&",
                            "mv", "-f", QuoteString(partial), QuoteString(target))


# Part of the venv's identity besides the lock: bump it when the way a venv is built changes,
# so every host rebuilds. (2: byte-compile at install, since the service's /opt is read-only
# and a venv without .pyc files spends ~60 s compiling on every start.)
VENV_RECIPE = "2"


def wheelhouse_lock_digest(wheelhouse_dir: str) -> str:
    lock = (Path(wheelhouse_dir) / "requirements.lock").read_bytes()
    return hashlib.sha256(lock + f"\nrecipe {VENV_RECIPE}".encode()).hexdigest()


def _venv_built(lock_path: Path, target: str, lock: str, python: str):
    """The commands that push the lock's wheels and build `target` from them, VENV_COMPLETE
    written last. Whatever touches the staging folder or `target` holds `lock` (flock): a
    build that a killed deploy left running on the host ends before the staging folder is
    emptied for the push, and if it ended well, its venv is used, not built again. Only the
    live run removes the staging folder, after its own build: a build left waiting on the
    lock by an earlier killed run finds the venv complete and leaves both alone."""
    staging = f"{target}.wheels"
    yield StringCommand("flock", QuoteString(lock), "sh", "-c", QuoteString(
        shlex.join(["rm", "-rf", staging]) + " && " + shlex.join(["mkdir", "-p", staging])))
    wheels = [line.split("#", 1)[1].strip()
              for line in lock_path.read_text().splitlines()[1:] if "#" in line]
    for wheel in wheels:
        yield FileUploadCommand(str(lock_path.parent / wheel), f"{staging}/{wheel}")
    yield FileUploadCommand(str(lock_path), f"{staging}/requirements.lock")
    build = " && ".join([
        shlex.join(["rm", "-rf", target]),
        shlex.join([python, "-m", "venv", target]),
        shlex.join([f"{target}/bin/pip", "install", "--quiet", "--no-index", "--no-deps",
                    "--require-hashes", "--disable-pip-version-check", "--find-links", staging,
                    "-r", f"{staging}/requirements.lock"]),
        shlex.join(["touch", f"{target}/{VENV_COMPLETE}"])])
    complete = shlex.join(["test", "-e", f"{target}/{VENV_COMPLETE}"])
    yield StringCommand("flock", QuoteString(lock), "sh", "-c",
                        QuoteString(f"{complete} || {{ {build}; }}"))
    yield StringCommand("rm", "-rf", QuoteString(staging))


@operation()
def wheelhouse_venv_installed(wheelhouse_dir: str, venv_link: str, python: str = "python3"):
    """
    Make ``venv_link`` point at a venv holding exactly the wheels of a controller wheelhouse.

    + wheelhouse_dir: folder made by wheelhouse (wheels + requirements.lock)
    + venv_link: path the service uses; a symlink to ``<venv_link>-<lock digest>``
    + python: interpreter on the host that creates the venv

    Nothing reaches a package index: the wheels are pushed, then installed with
    ``--no-index --require-hashes``. A new lock builds a new venv beside the running one and
    switches the link atomically once the install succeeded; the previous venv is kept for
    rollback, older ones are removed. A venv whose build ended (VENV_COMPLETE inside it: the
    one kept, say) is switched to without a rebuild; one without it (a deploy killed mid-build)
    is removed and built again. The build holds ``<venv_link>.build-lock`` (flock): a pip
    the killed deploy left running on the host ends before the next push and build start,
    and a venv it completed is used as it is.
    """
    lock_path = Path(wheelhouse_dir) / "requirements.lock"
    digest = wheelhouse_lock_digest(wheelhouse_dir)[:16]
    target = f"{venv_link}-{digest}"
    link = host.get_fact(Link, path=venv_link)
    if link is False:
        # Something else sits there (a venv made by hand): `mv -T` of the new link would fail
        # on every run after building a whole venv, so say so before building anything.
        yield failing_command(f"{venv_link} on {host.name} is not a symlink (a venv made by "
                              "hand?): move it aside; the deploy manages it as a link to "
                              f"{venv_link}-<lock digest>\n")
        return
    current = link["link_target"] if link else None
    if current == target:
        host.noop(f"{venv_link} -> {target}")
        return
    if not host.get_fact(File, path=f"{target}/{VENV_COMPLETE}"):  # else kept: switch back
        yield from _venv_built(lock_path, target, f"{venv_link}.build-lock", python)
    yield StringCommand("ln", "-sfn", QuoteString(target), QuoteString(f"{venv_link}.new"),
                        "&&", "mv", "-T", QuoteString(f"{venv_link}.new"), QuoteString(venv_link))
    keep = [Path(target).name] + ([Path(current).name] if current else [])
    prune = ["find", QuoteString(str(Path(venv_link).parent)), "-maxdepth", "1", "-type", "d",
             "-name", QuoteString(f"{Path(venv_link).name}-*")]
    for name in keep:
        prune += ["!", "-name", QuoteString(name)]
    yield StringCommand(*prune, "-exec", "rm", "-rf", "{}", "+")


@operation(is_idempotent=False)
def service_healthy(url: str, timeout_s: int, unit: str, when: bool = True, restore: str = "",
                    curl_options: list[str] | None = None):
    """
    Wait on the host until ``url`` answers 2xx; fail with the unit's last log lines once the
    timeout passes or the unit exits (``Restart=always`` would start it again: a server that
    rejects its command line is known to fail long before the timeout).

    + url: health URL as seen from the host
    + timeout_s: seconds to wait before failing
    + unit: systemd unit whose journal is shown on failure
    + when: wait only if True (pass whether the service was (re)started, so an unchanged
      host yields no command)
    + restore: shell commands run on the host after a failure, before the operation fails
      (tasks/vllm_service.py puts the last good release back)
    + curl_options: more curl options (TLS: the CA to trust, the name resolved to loopback)
    """
    if not when:
        host.noop(f"{unit} was not restarted; no need to wait for {url}")
        return
    quoted_url, quoted_unit = shlex.quote(url), shlex.quote(unit)
    options = "".join(f"{shlex.quote(option)} " for option in curl_options or [])
    timed_out = shlex.quote(f"{host.name}: {unit} did not answer {url} within "
                            f"{int(timeout_s)}s; its last log lines:")
    exited = shlex.quote(f"{host.name}: {unit} exited before it answered {url}; its last "
                         "log lines:")
    restarts = f"systemctl show --value -p NRestarts {quoted_unit}"
    # A server's last lines are often its top-level traceback ("See root cause above"): the
    # exceptions it logged since the restart follow them, the first of them the cause. A
    # line may start with vLLM's process and log prefixes: "(Worker pid=9) ERROR 12-04
    # 20:48:33 [multiproc_executor.py:953] safetensors_rust.SafetensorError: ...".
    errors = shlex.quote(f"{host.name}: the first exceptions {unit} logged since the restart:")
    exceptions = (f"found=$(journalctl -u {quoted_unit} --since "
                  f"@$(( deadline - {int(timeout_s) + 1} )) --no-pager -o cat | "
                  "grep -E '^(\\([^)]*\\) )?([A-Z]+ [0-9-]+ [0-9:]+ \\[[^]]*\\] )?"
                  "[A-Za-z_.]*(Error|Exception)(:|$)' | head -n 8); "
                  f'if [ -n "$found" ]; then echo {errors} >&2; '
                  """printf '%s\\n' "$found" >&2; fi; """)
    script = (
        f"deadline=$(( $(date +%s) + {int(timeout_s)} )); restarts=$({restarts}); "
        f"until curl -fs -o /dev/null --max-time 5 {options}{quoted_url}; do why=; "
        f'if [ "$({restarts})" != "$restarts" ] || '
        f"systemctl show --value -p SubState {quoted_unit} | grep -qx 'auto-restart\\|failed'; "
        f"then why={exited}; "
        f"elif [ $(date +%s) -ge $deadline ]; then why={timed_out}; fi; "
        f'if [ -n "$why" ]; then echo "$why" >&2; '
        f"journalctl -u {quoted_unit} -n 40 --no-pager -o cat >&2; {exceptions}"
        f"{restore + '; ' if restore else ''}exit 1; fi; sleep 1; done"
    )
    yield StringCommand("sh", "-c", QuoteString(script))


@operation()
def every_host_reached(step: str):
    """
    Change nothing: a point of deploy.py that every host's deploy passes, at one line.

    + step: what every host has done by then, for the log

    pyinfra runs each operation on every host before the next one, and orders the operations
    of different hosts only where they share one: the router's operations, which share none
    with the trays', would be planned among the trays' first ones. Called by every host at the
    same line, this operation is shared; what a host does after it starts once every host has
    finished what it did before.
    """
    host.noop(f"every host has reached this point: {step}")
    yield from ()


@operation()
def secret_file_present(dest: str, content: str):
    """
    Make ``dest`` a root-owned 0600 file holding ``content``, without ever showing it.

    + dest: path on the host
    + content: the file's text (secrets: never printed, not even with ``--diff``)

    The file is created empty with mode 0600 before the content is written into it and renamed
    into place, so the secret is never readable by others, not even for a moment.
    """
    wanted = hashlib.sha256(content.encode()).hexdigest()
    present = host.get_fact(File, path=dest)
    if present and host.get_fact(Sha256File, path=dest) == wanted:
        if present["user"] == "root" and present["mode"] == 600:
            host.noop(f"{dest} is current (root, 0600)")
            return
        yield StringCommand("chown", "root:root", QuoteString(dest), "&&",
                            "chmod", "0600", QuoteString(dest))
        return
    partial = f"{dest}.partial"
    yield StringCommand("mkdir", "-p", QuoteString(str(Path(dest).parent)), "&&",
                        "install", "-m", "0600", "-o", "root", "-g", "root", "/dev/null",
                        QuoteString(partial))
    yield FileUploadCommand(io.BytesIO(content.encode()), partial)
    yield StringCommand("mv", "-f", QuoteString(partial), QuoteString(dest))


# The checksum fact of each digest: content_differs asks the one the operation writing the
# file already asked (secret_file_present: Sha256File; pyinfra's files.put: Sha1File), so that no
# extra command goes to the host.
_DIGESTS = {Sha256File: hashlib.sha256, Sha1File: hashlib.sha1}


def content_differs(dest: str, content: str, fact=Sha256File) -> bool:
    """Whether ``dest`` on the host lacks exactly ``content`` (a missing file counts). What a
    restart decision reads: an operation's will_change also counts a mode or owner fix, which
    changes nothing a service reads.

    + fact: Sha256File (what secret_file_present asks) or Sha1File (what files.put asks)
    """
    return host.get_fact(fact, path=dest) != _DIGESTS[fact](content.encode()).hexdigest()


@operation()
def drop_ins_removed(unit: str):
    """
    Remove the administrator's drop-ins of ``unit``: ``systemctl edit``, ``systemctl
    set-property`` and files written by hand, loaded or not (tasks.facts.SystemdDropIns).

    + unit: the systemd unit, whose whole definition the deploy declares

    A drop-in changes what runs while the unit file stays as declared, so it is drift: removed
    here, and reported by the drift check's plan until then. The caller reloads systemd and
    restarts the unit when this changes anything. Drop-ins for every service (``service.d``)
    are not this unit's to remove: the infra checks report them.

    **Example:**

    .. code:: python

        drop_ins_removed(name="Remove local drop-ins of vllm.service", unit="vllm.service")
    """
    own = [path for path in host.get_fact(SystemdDropIns, unit=unit)
           if posixpath.basename(posixpath.dirname(path)) == f"{unit}.d"]
    if not own:
        host.noop(f"{unit} has no local drop-in")
        return
    folders = sorted({posixpath.dirname(path) for path in own})
    yield StringCommand("rm", "-f", *(QuoteString(path) for path in own), "&&",
                        "rmdir", "--ignore-fail-on-non-empty",
                        *(QuoteString(folder) for folder in folders))


def failing_command(message: str, unless: tuple = ()) -> StringCommand:
    """A command that prints ``message`` to stderr and fails (unless the shell test ``unless``
    passes): how an operation refuses a host. ``message`` ends with its own newline."""
    if not unless:
        return StringCommand("printf", "%s", QuoteString(message), ">&2", "&&", "exit", "1")
    return StringCommand(*unless, "||", "{", "printf", "%s", QuoteString(message), ">&2;",
                         "exit", "1;", "}")


@operation()
def docker_image_present(reference: str, architecture: str, archive: str | None = None,
                         image_id: str | None = None, staging_dir: str = "/var/lib/vllm-images"):
    """
    Make ``reference`` name an image of ``architecture`` in the host's Docker, so a unit can
    start it with ``--pull never``.

    + reference: a pinned ``name:tag[@sha256:...]``
    + architecture: what the host runs (``arm64``, ``amd64``)
    + archive: controller path of a ``docker save`` archive holding ``reference``: pushed and
      loaded when the host lacks ``image_id`` (air-gapped sites); None pulls ``reference``
    + image_id: the archive's image ID (``sha256:`` of its config)
    + staging_dir: host folder the archive waits in until ``docker load`` (as NAME.staged,
      removed after; any other *.staged there, from a killed push, is removed before)

    A pulled image of another architecture is refused, not run: on a Grace host an x86-only
    tag ends in ``exec format error`` at every start.
    """
    if archive is not None and not image_id:
        raise OperationValueError("docker_image_present: an archive needs its image_id (else "
                                  "it would be loaded on every run)")
    present = host.get_fact(DockerImage, reference=reference)
    if archive is not None:
        if present and present["id"] == image_id:
            host.noop(f"{reference} is loaded ({image_id[:19]})")
            return
        staged = f"{staging_dir}/{Path(archive).name}{STAGED}"
        # An archive a killed deploy left half pushed (under this name or an earlier one) is
        # removed first, not left behind to fill the disk.
        yield StringCommand("mkdir", "-p", "-m", "0700", QuoteString(staging_dir), "&&",
                            "find", QuoteString(staging_dir), "-maxdepth", "1", "-type", "f",
                            "-name", QuoteString(f"*{STAGED}"), "-delete")
        yield FileUploadCommand(archive, staged)
        yield StringCommand("docker", "load", "--quiet", "--input", QuoteString(staged),
                            "&&", "rm", "-f", QuoteString(staged))
        check = f"{reference} is not {image_id} after docker load of {Path(archive).name}\n"
        loaded = f'"$(docker image inspect --format {{{{.Id}}}} {reference})"'
        yield failing_command(check, unless=("test", loaded, "=", image_id))
        return
    wrong = (f"{reference} on {host.name} is built for {{found}}, not this host's "
             f"{architecture}: pin a tag published for linux/{architecture} (`docker manifest "
             f"inspect {reference}` lists a tag's platforms) and `docker rmi` this one\n")
    if present:
        if present["architecture"] != architecture:
            yield failing_command(wrong.format(found=f"{present['os']}/{present['architecture']}"))
            return
        host.noop(f"{reference} is present ({present['id'][:19]}, {architecture})")
        return
    yield StringCommand("docker", "pull", "--quiet", "--platform", f"linux/{architecture}",
                        QuoteString(reference))
    found = f"$(docker image inspect --format {{{{.Architecture}}}} {reference})"
    yield failing_command(wrong.format(found="another architecture"),
                  unless=("test", f'"{found}"', "=", architecture))
