"""vllm.service: the unit, its secrets, restart only on change, then wait until healthy.

One unit name for both systemd runtimes: venv runs `vllm serve` from the venv, docker runs it
in the pinned image (tasks/vllm_container.py). The checks, the drift check and the health wait
therefore read the same unit whichever runtime a host uses.
"""

import io
import shlex

from pyinfra import host, logger
from pyinfra.api import StringCommand, deploy, operation
from pyinfra.api.operation import OperationMeta
from pyinfra.api.util import get_template
from pyinfra.facts.files import File, Sha1File
from pyinfra.operations import files, server, systemd

from tasks import tls, vllm_container
from tasks.facts import CpuArchitecture, SystemdVersion
from tasks.models import systemd_exec_line
from tasks.operations import content_differs, drop_ins_removed, service_healthy, secret_file_present
from tasks.settings import (ENV_FILE, OFFLINE_ENVIRONMENT, TEMPLATES, UNIT_NAME, Settings,
                            read_settings)

UNIT_PATH = f"/etc/systemd/system/{UNIT_NAME}"
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
# nothing removes images). Root only: the env file holds the API key.
RELEASE_DIR = "/var/lib/vllm-release"
RELEASE_UNIT, RELEASE_ENV, RELEASE_VENV = "vllm.service", "vllm.env", "venv-link"
RELEASE_TLS = "tls"  # the TLS folder the release served with (tasks/tls.py), if any
RELEASE_PROBE = "health-probe"  # how the release answers /health (plain HTTP or TLS)
# A run that will restart vLLM marks it due before its first change of what vLLM reads
# (weights, venv or image, env file, unit), and clears the mark once the restarted server
# answers /health: a run killed in between leaves the mark, and the next run restarts vLLM
# although it finds nothing left to change. At worst (killed after the mark, before any
# change) one restart too many.
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


def keep_release_script(venv_link: str, probe: str) -> str:
    """Shell: copy what vllm.service runs now into RELEASE_DIR, with `probe` (health_probe:
    how this release answers, by plain HTTP or TLS), replacing the release kept before only
    once the new copy is whole."""
    release, staging = shlex.quote(RELEASE_DIR), shlex.quote(f"{RELEASE_DIR}.new")
    link = shlex.quote(venv_link)
    return (f"rm -rf {staging} && mkdir -m 0700 {staging} && "
            f"cp -p {UNIT_PATH} {staging}/{RELEASE_UNIT} && "
            f"cp -p {ENV_FILE} {staging}/{RELEASE_ENV} && "
            f"{{ [ ! -d {tls.TLS_DIR} ] || cp -a {tls.TLS_DIR} {staging}/{RELEASE_TLS}; }} && "
            f"printf '%s\\n' {shlex.quote(probe)} > {staging}/{RELEASE_PROBE} && "
            f"{{ readlink {link} > {staging}/{RELEASE_VENV} || true; }} && "
            f"rm -rf {release}.old && {{ [ ! -e {release} ] || mv {release} {release}.old; }} && "
            f"mv {staging} {release} && rm -rf {release}.old")


def restore_release_script(venv_link: str, probe: str, timeout_s: int) -> str:
    """Shell, run when a restarted vllm.service fails its health wait: put the last good
    release back (unit, env file, TLS files, venv link), restart, and say whether it serves
    again, asked as that release answers (its kept probe; `probe`, the new release's, for a
    release kept without one). The deploy fails either way; the next one tries the declared
    release again."""
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
            f"systemctl daemon-reload; systemctl restart {UNIT_NAME}; "
            f"probe={shlex.quote(probe)}; [ ! -f {release}/{RELEASE_PROBE} ] || "
            f"probe=$(cat {release}/{RELEASE_PROBE}); "
            f"deadline=$(( $(date +%s) + {int(timeout_s)} )); verdict={serves}; "
            f'until sh -c "$probe"; do '
            f"if [ $(date +%s) -ge $deadline ]; then verdict={down}; break; fi; sleep 1; done; "
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
    """Before anything vLLM reads changes: mark a restart due if this run restarts vLLM, so
    that a run killed before the restart is finished by the next one (RESTART_MARK). Returns
    the decision for run() to fill in."""
    decision = {"due": False}
    restart_due_marked(name=f"Mark a restart of {UNIT_NAME} due ({RESTART_MARK}), if this "
                       "run restarts it", decision=decision)
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


@deploy(DEPLOY_NAME)
def run(restart_triggers: list[OperationMeta], restart_due: dict | None = None) -> None:
    """Converge vllm.service: secrets env file, unit, no local drop-in, enabled and running;
    restart it only when what vLLM reads changed (the env file's or the unit's content, a
    drop-in, a trigger: weights, runtime), then wait for /health. A mode or owner fix of a
    file it reads is made without a restart. A restart that answers /health is kept as the
    last good release (RELEASE_DIR); one that exits or times out puts that release back,
    restarts it, and the deploy fails naming the host and vLLM's last log lines.

    Data keys: vllm_api_key_file, vllm_environment, vllm_cpu_threads_bind,
    vllm_health_timeout_s, vllm_load_bytes_per_s, and those rendered into the command line
    (model_*, vllm_host, vllm_port, vllm_tensor_parallel_size, vllm_gpu_memory_utilization,
    vllm_shutdown_timeout_s, vllm_extra_args); for the docker runtime also vllm_image and vllm_container_gpus.
    """
    settings = read_settings(host)
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
    if restart_due is not None:
        restart_due["due"] = read_changed  # mark_restart_due's operation reads it when it runs
    # After an interrupted run the unit on disk may be newer than what systemd loaded (killed
    # before its daemon-reload): reload then too, or the restart would run the old definition.
    service = systemd.service(
        name=RESTART_NAME,
        service=UNIT_NAME, running=True, enabled=True, restarted=read_changed,
        daemon_reload=definition_changed or interrupted)
    # A release that does not come up is replaced by the last good one (still a failure).
    probe = health_probe(settings.health_url, settings.local_curl_options)
    service_healthy(name="Wait for vLLM /health", url=settings.health_url,
                    curl_options=settings.local_curl_options,
                    timeout_s=settings.health_timeout_s, unit=UNIT_NAME, when=service.will_change,
                    restore=restore_release_script(settings.venv_dir, probe,
                                                   settings.health_timeout_s))
    if service.will_change:
        server.shell(name="Keep the release that now serves as the last good one",
                     commands=[keep_release_script(settings.venv_dir, probe),
                               f"rm -f {RESTART_MARK}"])
