"""vllm.service: the unit, its secrets, restart only on change, then wait until healthy.

One unit name for both systemd runtimes: venv runs `vllm serve` from the venv, docker runs it
in the pinned image (tasks/vllm_container.py). The checks, the drift check and the health wait
therefore read the same unit whichever runtime a host uses.
"""

import io
import shlex
from pathlib import PurePosixPath

from pyinfra import host, logger
from pyinfra.api import StringCommand, deploy, operation
from pyinfra.api.operation import OperationMeta
from pyinfra.api.util import get_template
from pyinfra.facts.files import Directory, File, Sha1File, Sha256File
from pyinfra.operations import files, server, systemd

from tasks import facts_together, tls, vllm_container
from tasks.facts import CpuArchitecture, SystemdDropIns, SystemdVersion
from tasks.models import systemd_exec_line
from tasks.operations import content_differs, drop_ins_removed, service_healthy, secret_file_present
from tasks.settings import (ENV_FILE, OFFLINE_ENVIRONMENT, TEMPLATES, UNIT_DIR, UNIT_NAME,
                            Settings, read_settings)
from tasks.weights import state_dir_of
from tasks.weights_job import RECORDS_DIR

UNIT_PATH = f"{UNIT_DIR}/{UNIT_NAME}"
# The offline list, plus folders a read-only system leaves writable.
SERVICE_ENVIRONMENT = {
    **OFFLINE_ENVIRONMENT,
    "HOME": "/var/lib/vllm",
    "XDG_CACHE_HOME": "/var/cache/vllm",
    "VLLM_CACHE_ROOT": "/var/cache/vllm/vllm",
    "TORCHINDUCTOR_CACHE_DIR": "/var/cache/vllm/inductor",
    "TMPDIR": "/var/cache/vllm",
}
# RestartSteps= and RestartMaxDelaySec= (restart backoff) arrived in systemd 254.
BACKOFF_SYSTEMD = 254
# The last good release: what vllm.service ran when it last answered /health after a
# (re)start. The unit (argv, image reference), the env file and the venv the link pointed at;
# the venv itself and the image stay on the host (tasks/operations.py keeps the previous venv,
# nothing removes images); the weights folders, as hard links beside them (RELEASE_WEIGHTS).
# Root only: the env file holds the API key.
RELEASE_DIR = "/var/lib/vllm-release"
RELEASE_UNIT, RELEASE_ENV, RELEASE_VENV = "vllm.service", "vllm.env", "venv-link"
RELEASE_TLS = "tls"  # the TLS folder the release served with (tasks/tls.py), if any
RELEASE_PROBE = "health-probe"  # how the release answers /health (plain HTTP or TLS)
# The weights folders the release served, one per line. Each is kept beside itself (same
# filesystem) as hard links, last_good_copy: every writer of a weights folder renames a new
# file into place or unlinks one, never writes into one, so a kept link still holds the bytes
# the release loaded, and costs disk only for files a later release replaced.
RELEASE_WEIGHTS = "weights"
# A run that will restart vLLM marks it due before its first change of what vLLM reads, and
# clears the mark once the restarted server answers /health: a run killed in between leaves
# the mark, and the next run restarts vLLM although it finds nothing left to change. What
# switches in place (the weights, a venv link, an image archive loaded under the unit's tag)
# is marked before the weights step; the rest (a pulled image, which only the unit's new
# reference puts to use; the env file, TLS files, the unit) just before the files change,
# so a run that fails at a pull leaves no mark. At worst (killed after a mark, before the
# change it announces) one restart too many.
RESTART_MARK = f"{RELEASE_DIR}.restart-due"
# The operation that (re)starts vLLM, as a plan names it: a host it changes restarts vLLM
# (tools/rollout.py rolls those hosts batch by batch).
DEPLOY_NAME = "vLLM service"
RESTART_NAME = f"Enable and start {UNIT_NAME}, restart if its inputs changed"
RESTART_OPERATION = f"{DEPLOY_NAME} | {RESTART_NAME}"


def unit_template(settings: Settings) -> tuple[str, dict]:
    """The unit template of the host's runtime, and what it needs beyond the common values."""
    environment = {**SERVICE_ENVIRONMENT, **settings.environment}
    if settings.runtime == "docker":
        image = vllm_container.image_reference(settings, host.get_fact(CpuArchitecture))
        argv = vllm_container.container_argv(settings, image, environment,
                                              settings.stop_timeout_s)
        return "vllm-container.service.j2", {
            "docker": vllm_container.DOCKER, "container": vllm_container.CONTAINER_NAME,
            "exec_start": systemd_exec_line(argv)}
    return "vllm.service.j2", {
        "env_file": ENV_FILE, "environment": sorted(environment.items()),
        "credentials": tls.credentials() if settings.tls else [],
        "exec_start": systemd_exec_line([f"{settings.venv_dir}/bin/vllm", *settings.serve_args])}


def env_file_content(api_key: str | None) -> str:
    lines = ["# Managed by tasks/vllm_service.py: secrets for vllm.service (root, 0600)."]
    if api_key:
        lines.append(f"VLLM_API_KEY={api_key}")
    return "\n".join(lines) + "\n"


def unit_text(settings: Settings) -> str:
    """vllm.service as installed: the runtime's template, rendered as files.template would."""
    template, context = unit_template(settings)
    return get_template(str(TEMPLATES / template)).render(
        served_name=settings.profile.served_name, profile_name=settings.profile.name,
        stop_timeout_s=settings.stop_timeout_s,
        restart_backoff=(host.get_fact(SystemdVersion) or 0) >= BACKOFF_SYSTEMD, **context)


def health_probe(url: str, curl_options: list[str] = ()) -> str:
    """The shell command that asks a release's /health once (5 s at most)."""
    return shlex.join(["curl", "-fs", "-o", "/dev/null", "--max-time", "5", *curl_options, url])


def _beside(folder: str, suffix: str) -> str:
    path = PurePosixPath(folder)
    return str(path.parent / f".{path.name}.{suffix}")


def last_good_copy(folder: str) -> str:
    """Where the weights folder the last good release served is kept: beside it, hidden."""
    return _beside(folder, "last-good")


def _linked_copy(source: str, dest: str) -> str:
    """Shell: `dest` made a hard-linked copy of the folder `source`, but for the downloader's
    records (RECORDS_DIR), which the Hub client writes in place: those are copied."""
    records, q = f"{source}/{RECORDS_DIR}", shlex.quote
    return (f"cp -al {q(source)} {q(dest)} && {{ [ ! -d {q(records)} ] || "
            f"{{ rm -rf {q(f'{dest}/{RECORDS_DIR}')} && cp -a {q(records)} {q(dest)}/; }}; }}")


def weights_kept_script(folders: list[str]) -> str:
    """Shell: keep each weights folder vLLM now serves at last_good_copy (its tree linked, its
    Hub fetch state copied), replacing the copy kept before once the new one is whole. A
    folder that cannot be linked (another filesystem) is kept without, with a warning: a
    restore then leaves it as it is."""
    parts = []
    for folder in folders:
        kept, q = last_good_copy(folder), shlex.quote
        new, state = f"{kept}.new", state_dir_of(folder)
        warning = q(f"{folder} could not be kept as hard links in {kept}: a restore of "
                    "this release will not put its weights back")
        parts.append(f"{{ rm -rf {q(new)} && mkdir -m 0700 {q(new)} && "
                     f"{_linked_copy(folder, f'{new}/tree')} && "
                     f"{{ [ ! -d {q(state)} ] || cp -a {q(state)} {q(new)}/state; }} && "
                     f"rm -rf {q(kept)} && mv {q(new)} {q(kept)}; }} || "
                     f"{{ rm -rf {q(new)}; echo {warning} >&2; }}")
    return " && ".join(parts) or "true"


def weights_restored_script(folders: list[str], name: str, release_dir: str = RELEASE_DIR) -> str:
    """Shell: each of `folders` that the kept release served (RELEASE_WEIGHTS) put back from
    its last_good_copy, with its Hub fetch state; the failed release's files removed (the
    next deploy fetches or pushes them again). One without a kept copy is left as it is."""
    parts = []
    for folder in folders:
        kept, q = last_good_copy(folder), shlex.quote
        restoring, failed = _beside(folder, "restoring"), _beside(folder, "failed")
        state = state_dir_of(folder)
        done = q(f"{name}: weights {folder} put back as the last good release served them")
        failed_note = q(f"{name}: could not put the weights in {folder} back from {kept}")
        parts.append(
            f"if grep -qxF -- {q(folder)} {q(release_dir)}/{RELEASE_WEIGHTS} 2>/dev/null && "
            f"[ -d {q(kept)}/tree ]; then "
            f"{{ rm -rf {q(restoring)} {q(failed)} && {_linked_copy(f'{kept}/tree', restoring)} "
            f"&& {{ [ ! -e {q(folder)} ] || mv {q(folder)} {q(failed)}; }} && "
            f"mv {q(restoring)} {q(folder)} && rm -rf {q(failed)} {q(state)} && "
            f"{{ [ ! -d {q(kept)}/state ] || cp -a {q(kept)}/state {q(state)}; }} && "
            f"echo {done} >&2; }} || echo {failed_note} >&2; fi")
    return "; ".join(parts) or "true"


def keep_release_script(venv_link: str, probe: str, folders: list[str]) -> str:
    """Shell: copy what vllm.service runs now into RELEASE_DIR, with `probe` (health_probe:
    how this release answers, by plain HTTP or TLS) and the weights `folders` it serves (kept
    as weights_kept_script says), replacing the release kept before only once the new copy
    is whole."""
    release, staging = shlex.quote(RELEASE_DIR), shlex.quote(f"{RELEASE_DIR}.new")
    link = shlex.quote(venv_link)
    return (f"rm -rf {staging} && mkdir -m 0700 {staging} && "
            f"cp -p {UNIT_PATH} {staging}/{RELEASE_UNIT} && "
            f"cp -p {ENV_FILE} {staging}/{RELEASE_ENV} && "
            f"{{ [ ! -d {tls.TLS_DIR} ] || cp -a {tls.TLS_DIR} {staging}/{RELEASE_TLS}; }} && "
            f"printf '%s\\n' {shlex.quote(probe)} > {staging}/{RELEASE_PROBE} && "
            f"{{ readlink {link} > {staging}/{RELEASE_VENV} || true; }} && "
            f"printf '%s\\n' {shlex.join(folders)} > {staging}/{RELEASE_WEIGHTS} && "
            f"{weights_kept_script(folders)} && "
            f"rm -rf {release}.old && {{ [ ! -e {release} ] || mv {release} {release}.old; }} && "
            f"mv {staging} {release} && rm -rf {release}.old")


def restore_release_script(venv_link: str, probe: str, timeout_s: int,
                           folders: list[str]) -> str:
    """Shell, run when a restarted vllm.service fails its health wait: put the last good
    release back (unit, env file, TLS files, venv link, the weights of `folders` it served),
    restart, and say whether it serves again, asked as that release answers (its kept probe;
    `probe`, the new release's, for a release kept without one). One that serves again
    was just started on what it reads: no restart is due (RESTART_MARK removed). The deploy
    fails either way; the next one tries the declared release again."""
    release, link, name = shlex.quote(RELEASE_DIR), shlex.quote(venv_link), host.name
    none = shlex.quote(f"{name}: no last good release is kept in {RELEASE_DIR} (the first "
                       f"deploy never answered /health): nothing to restore, {UNIT_NAME} is "
                       "down")
    serves = shlex.quote(f"{name}: the last good release serves again (it answers /health); "
                         "the new one is not running: fix it and deploy again")
    restoring = shlex.quote(f"{name}: restoring the last good release from {RELEASE_DIR}")
    down = shlex.quote(f"{name}: the last good release did not answer /health within "
                       f"{int(timeout_s)}s either: {UNIT_NAME} is down")
    return (f"if [ ! -f {release}/{RELEASE_UNIT} ]; then echo {none} >&2; else "
            f"echo {restoring} >&2; "
            f"install -m 0644 {release}/{RELEASE_UNIT} {UNIT_PATH}; "
            f"install -m 0600 {release}/{RELEASE_ENV} {ENV_FILE}; "
            f"rm -rf {tls.TLS_DIR}; [ ! -d {release}/{RELEASE_TLS} ] || "
            f"cp -a {release}/{RELEASE_TLS} {tls.TLS_DIR}; "
            f"target=$(cat {release}/{RELEASE_VENV} 2>/dev/null); "
            f'if [ -n "$target" ] && [ -d "$target" ]; then '
            f'ln -sfn "$target" {link}.new && mv -T {link}.new {link}; fi; '
            f"{weights_restored_script(folders, name)}; "
            f"systemctl daemon-reload; systemctl restart {UNIT_NAME}; "
            f"probe={shlex.quote(probe)}; [ ! -f {release}/{RELEASE_PROBE} ] || "
            f"probe=$(cat {release}/{RELEASE_PROBE}); "
            f"deadline=$(( $(date +%s) + {int(timeout_s)} )); verdict={serves}; "
            f'until sh -c "$probe"; do '
            f"if [ $(date +%s) -ge $deadline ]; then verdict={down}; break; fi; sleep 1; done; "
            f'[ "$verdict" = {down} ] || rm -f {RESTART_MARK}; '
            f'echo "$verdict" >&2; fi')


@operation()
def restart_due_marked(decision: dict):
    """
    Write RESTART_MARK when this run restarts vLLM; otherwise nothing.

    + decision: {"due": bool}, filled in by vllm_service.run, later in the deploy file

    The decision is read when the operation runs: pyinfra runs an operation's function again
    at execution, after the whole deploy file has been read. A plan made before that (--dry)
    shows no change here; it shows the restart itself.
    """
    if not decision.get("due"):
        host.noop(f"no restart of {UNIT_NAME} due from this run, as decided when this runs")
        return
    yield StringCommand("touch", RESTART_MARK)


@deploy("vLLM restart mark")
def mark_restart_due() -> dict:
    """Before the weights and the runtime change: mark a restart due if this run switches
    either in place, so that a run killed before the restart is finished by the next one
    (RESTART_MARK). Returns the decision for run() to fill in."""
    decision = {"due": False}
    restart_due_marked(name=f"Mark a restart of {UNIT_NAME} due ({RESTART_MARK}), if this "
                       "run switches the weights or the runtime", decision=decision)
    return decision


def tls_files_placed(settings: Settings) -> bool:
    """vLLM's TLS files on the host, root-only (tasks/tls.py), or none without TLS; whether
    vLLM must restart to read them (a rotation: the content changed, not a mode fix)."""
    if settings.tls is None:
        files.directory(name=f"No vLLM TLS files in {tls.TLS_DIR}", path=tls.TLS_DIR,
                        present=False)
        return False  # the command line lost its TLS flags: the unit's change restarts
    for path, content in tls.host_files(settings.tls):
        secret_file_present(name=f"Install vLLM TLS file {path}", dest=path, content=content)
    return any(content_differs(path, content) for path, content in tls.host_files(settings.tls))


def _marks_decided(settings: Settings, runtime: OperationMeta, restart_triggers: list,
                   restart_due: dict | None) -> dict:
    """Fill in mark_restart_due's decision (a trigger that switches in place changes), and
    add the mark written just before vllm.service's own files change; returns its decision,
    for run() to fill in, with "switched": whether the early mark was due."""
    # A pulled image changes nothing vLLM runs until the unit names it (RESTART_MARK).
    pulled = settings.runtime == "docker" and settings.image_archive is None
    switched = restart_due is not None and any(
        trigger.will_change for trigger in restart_triggers
        if not (pulled and trigger is runtime))
    if restart_due is not None:
        restart_due["due"] = switched  # mark_restart_due's operation reads it when it runs
    marked = {"due": False, "switched": switched}
    restart_due_marked(name=f"Mark a restart of {UNIT_NAME} due ({RESTART_MARK}) before its "
                       "files change, if this run restarts it", decision=marked)
    return marked


def facts_read(settings: Settings) -> list[tuple[type, dict]]:
    """The facts run()'s operations read on a host where vLLM runs as declared (to be asked
    together: tasks/facts_together.py)."""
    wanted = [(SystemdVersion, {}), *facts_together.written_file(ENV_FILE, Sha256File)]
    if settings.runtime == "docker":
        wanted.append((CpuArchitecture, {}))
    if settings.tls is None:
        wanted.append((Directory, {"path": tls.TLS_DIR}))
    else:
        for path, _ in tls.host_files(settings.tls):
            wanted += facts_together.written_file(path, Sha256File)
    return [*wanted, *facts_together.written_file(UNIT_PATH),
            (Directory, {"path": UNIT_DIR}),
            (SystemdDropIns, {"unit": UNIT_NAME}), (File, {"path": RESTART_MARK}),
            *facts_together.service(UNIT_NAME)]


@deploy(DEPLOY_NAME)
def run(runtime: OperationMeta, weights: OperationMeta | None = None,
        restart_due: dict | None = None) -> None:
    """Converge vllm.service: secrets env file, unit, no local drop-in, enabled and running;
    restart it only when what vLLM reads changed (the env file's or the unit's content, a
    drop-in, a trigger: weights, runtime), then wait for /health. A mode or owner fix of a
    file it reads is made without a restart. A restart that answers /health is kept as the
    last good release (RELEASE_DIR); one that exits or times out puts that release back,
    restarts it, and the deploy fails naming the host and vLLM's last log lines.

    + runtime, weights: the runtime's and the weights' operations (restart triggers)
    + restart_due: mark_restart_due's decision, filled in here (RESTART_MARK)

    Data keys: vllm_api_key_file, vllm_environment, vllm_cpu_threads_bind,
    vllm_health_timeout_s, vllm_load_bytes_per_s, and those rendered into the command line
    (model_*, vllm_host, vllm_port, vllm_tensor_parallel_size, vllm_gpu_memory_utilization,
    vllm_shutdown_timeout_s, vllm_extra_args); for the docker runtime also vllm_image and vllm_container_gpus.
    """
    settings = read_settings(host)
    facts_together.ask_together(host, facts_read(settings))
    restart_triggers = [trigger for trigger in (weights, runtime) if trigger is not None]
    marked = _marks_decided(settings, runtime, restart_triggers, restart_due)
    env_content = env_file_content(settings.api_key)
    secret_file_present(name=f"Install vLLM secrets file {ENV_FILE}", dest=ENV_FILE, content=env_content)
    tls_changed = tls_files_placed(settings)
    unit_content = unit_text(settings)
    files.put(name=f"Install {UNIT_NAME} unit ({settings.runtime} runtime)",
              src=io.StringIO(unit_content), dest=UNIT_PATH, user="root", group="root", mode="644")
    drop_ins = drop_ins_removed(name=f"Remove local drop-ins of {UNIT_NAME}", unit=UNIT_NAME)
    definition_changed = (content_differs(UNIT_PATH, unit_content, fact=Sha1File)
                          or drop_ins.will_change)
    interrupted = host.get_fact(File, path=RESTART_MARK) is not None
    if interrupted:
        host.log(f"{RESTART_MARK}: a run was stopped before it restarted {UNIT_NAME}; this run "
                 "restarts it", log_func=logger.warning)
    read_changed = (definition_changed or content_differs(ENV_FILE, env_content) or tls_changed
                    or any(trigger.will_change for trigger in restart_triggers) or interrupted)
    marked["due"] = read_changed and not marked["switched"]
    # After an interrupted run the unit on disk may be newer than what systemd loaded (killed
    # before its daemon-reload): reload then too, or the restart would run the old definition.
    service = systemd.service(
        name=RESTART_NAME,
        service=UNIT_NAME, running=True, enabled=True, restarted=read_changed,
        daemon_reload=definition_changed or interrupted)
    # A release that does not come up is replaced by the last good one (still a failure).
    probe = health_probe(settings.health_url, settings.local_curl_options)
    folders = [folder for folder in (settings.model_dir, settings.draft_dir) if folder]
    service_healthy(name="Wait for vLLM /health", url=settings.health_url,
                    curl_options=settings.local_curl_options,
                    timeout_s=settings.health_timeout_s, unit=UNIT_NAME, when=service.will_change,
                    restore=restore_release_script(settings.venv_dir, probe,
                                                   settings.health_timeout_s, folders))
    if service.will_change:
        server.shell(name="Keep the release that now serves as the last good one",
                     commands=[keep_release_script(settings.venv_dir, probe, folders),
                               f"rm -f {RESTART_MARK}"])
