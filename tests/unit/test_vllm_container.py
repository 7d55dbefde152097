"""The docker runtime (tasks/vllm_container.py, templates/vllm-container.service.j2): which
image a host gets and how, and the `docker run` line vllm.service runs.

The operations are planned on pyinfra's ``@fake`` connector, which stands in for a GB200 tray
(none exists here); the real container runs in the sandbox (tests/e2e/test_k_docker_runtime.py).
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import pytest
from pyinfra.api import (Config, FileUploadCommand, FunctionCommand, Inventory, State,
                         StringCommand)
from pyinfra.api.connect import connect_all
from pyinfra.api.deploy import add_deploy

from pyinfra.facts.files import Directory, File, Sha1File, Sha256File

from tasks import vllm_container, vllm_service
from tasks.facts import CpuArchitecture, DockerImage, SystemdDropIns, SystemdVersion
from tasks.models import systemd_exec_line
from tasks.data_keys import DataError
from tasks.settings import ENV_FILE, image_archive_info, read_settings
from tests.helpers import FakeHost, fact_command, group_data, planned_commands

SEED_IMAGE = "vllm/vllm-openai:v0.19.1-cu130"
ARM_ID = "sha256:" + "3f" * 32


def write_archive(path: Path, tag: str, architecture: str, layer: bytes = b"layer") -> Path:
    """A minimal `docker save` archive: a layer, the image config, then manifest.json last,
    where `docker save` puts it."""
    config = json.dumps({"architecture": architecture, "os": "linux",
                         "rootfs": {"type": "layers",
                                    "diff_ids": ["sha256:" + hashlib.sha256(layer).hexdigest()]}
                         }).encode()
    digest = hashlib.sha256(config).hexdigest()
    members = [("abc/layer.tar", layer), (f"{digest}.json", config),
               ("manifest.json", json.dumps([{"Config": f"{digest}.json", "RepoTags": [tag],
                                              "Layers": ["abc/layer.tar"]}]).encode())]
    with tarfile.open(path, "w") as archive:
        for name, content in members:
            info = tarfile.TarInfo(name)
            info.size = len(content)
            archive.addfile(info, io.BytesIO(content))
    return path


def docker_data(**overrides) -> dict:
    return {**group_data("gb200"), "model_profile": "kimi-k2.6-nvfp4", **overrides}


# ---- the archive a site without a registry pushes --------------------------------------------

def test_archive_info_reads_tag_id_and_architecture(tmp_path):
    archive = write_archive(tmp_path / "img.tar", SEED_IMAGE, "arm64")
    info = image_archive_info(str(archive))
    config_name = [m for m in tarfile.open(archive).getnames() if m.endswith(".json")
                   and m != "manifest.json"][0]
    assert info == {"tags": [SEED_IMAGE], "image_id": "sha256:" + config_name[:-5],
                    "architecture": "arm64", "os": "linux"}


@pytest.mark.parametrize("content", [b"not a tar", b""])
def test_a_file_that_is_no_archive_is_refused_naming_host_and_key(tmp_path, content):
    bogus = tmp_path / "img.tar"
    bogus.write_bytes(content)
    with pytest.raises(DataError) as error:
        read_settings(FakeHost("tray-01", docker_data(vllm_image_tarball=str(bogus))))
    assert f"tray-01: vllm_image_tarball: found '{bogus}'; need" in str(error.value)


def test_an_archive_without_the_pinned_tag_is_refused(tmp_path):
    archive = write_archive(tmp_path / "img.tar", "vllm/vllm-openai:v0.18.0-cu130", "arm64")
    with pytest.raises(DataError) as error:
        read_settings(FakeHost("tray-01", docker_data(vllm_image_tarball=str(archive))))
    assert "tray-01: vllm_image: found " in str(error.value)
    assert "v0.18.0-cu130" in str(error.value)


BAD_IMAGES = [
    ({"aarch64": "vllm/vllm-openai"}, "pinned by tag"),
    ({"aarch64": "vllm/vllm-openai:latest"}, "not latest"),
    ({"aarch64": "vllm/vllm-openai:v1@sha256:abc"}, "pinned by tag"),
    ({"sparc64": SEED_IMAGE}, "CPU architecture (x86_64, aarch64)"),
    ("vllm/vllm-openai:v0.19.1-cu130", "a mapping of CPU architecture"),
]


@pytest.mark.parametrize("images,need", BAD_IMAGES, ids=[str(i) for i, _ in BAD_IMAGES])
def test_unpinned_or_misplaced_images_are_refused(images, need):
    with pytest.raises(DataError) as error:
        read_settings(FakeHost("tray-01", docker_data(vllm_image=images)))
    assert "tray-01: vllm_image: found " in str(error.value) and need in str(error.value)


def test_a_digest_pinned_image_is_accepted():
    pinned = f"{SEED_IMAGE}@sha256:{'0' * 64}"
    settings = read_settings(FakeHost("tray-01", docker_data(vllm_image={"aarch64": pinned})))
    assert settings.image_for("aarch64") == pinned and settings.image_for("x86_64") is None


def test_an_unknown_gpu_mode_is_refused():
    with pytest.raises(DataError) as error:
        read_settings(FakeHost("tray-01", docker_data(vllm_container_gpus="all")))
    assert "tray-01: vllm_container_gpus: found 'all'; need" in str(error.value)


# ---- the docker run line ------------------------------------------------------------------

def test_the_container_runs_the_one_rendered_command_on_read_only_weights():
    settings = read_settings(FakeHost("tray-01", docker_data(model_speculative=True)))
    argv = vllm_container.container_argv(settings, SEED_IMAGE, {"A": "1"}, 60)
    image_at = argv.index(SEED_IMAGE)
    # Everything after the image is the venv runtime's `vllm serve ...`, flag for flag.
    assert argv[image_at - 2:image_at] == ["--entrypoint", "vllm"]
    assert argv[image_at + 1:] == settings.serve_args
    options = " ".join(argv[:image_at])
    assert options.startswith("/usr/bin/docker run --rm --name vllm --pull never ")
    assert "--runtime nvidia --gpus all --ipc host" in options
    assert "--cap-drop ALL --security-opt no-new-privileges" in options
    assert "--publish 0.0.0.0:8000:8000 --stop-timeout 60" in options
    assert f"--env-file {ENV_FILE} --env A=1" in options
    for folder in (settings.model_dir, settings.draft_dir):
        assert f"--volume {folder}:{folder}:ro" in options
    assert settings.draft_dir in settings.serve_args[settings.serve_args.index(
        "--speculative-config") + 1]


@pytest.mark.parametrize("mode,expected", [("cdi", ["--device", "nvidia.com/gpu=all"]),
                                           ("none", [])])
def test_gpu_handover_modes(mode, expected):
    settings = read_settings(FakeHost("tray-01", docker_data(vllm_container_gpus=mode)))
    argv = vllm_container.container_argv(settings, SEED_IMAGE, {}, 60)
    assert argv[argv.index("--pull") + 2:argv.index("--ipc")] == expected


def test_no_secret_reaches_the_unit(tmp_path):
    key = tmp_path / "key"
    key.write_text("s3cret-api-key\n")
    settings = read_settings(FakeHost("tray-01", docker_data(vllm_api_key_file=str(key))))
    argv = vllm_container.container_argv(settings, SEED_IMAGE, vllm_service.SERVICE_ENVIRONMENT,
                                         60)
    assert "s3cret-api-key" not in " ".join(argv)


# ---- planned on @fake: pull, load, refuse, nothing ------------------------------------------

def command_text(command) -> str:
    if isinstance(command, FileUploadCommand):
        return f"upload {command.src} -> {command.dest}"
    if isinstance(command, FunctionCommand):
        return f"call {command.function.__name__}"
    return command.get_raw_value() if isinstance(command, StringCommand) else command


def planned(data: dict, image: dict | None, systemd: int = 255, deploy=None, raw=False,
            answers: dict | None = None):
    """{operation name: commands} that would change something on a fake GB200 tray whose
    Docker holds ``image`` for the seed's tag, and that answers ``answers`` too."""
    answers = {
        **(answers or {}),
        fact_command(CpuArchitecture): ["aarch64"],
        fact_command(SystemdVersion): [f"systemd {systemd} (test)"],
        fact_command(DockerImage, reference=data["vllm_image"]["aarch64"]):
            [f"{image['id']} linux {image['architecture']}"] if image else [],
    }
    inventory = Inventory(([("@fake/tray-01", {**data, "fake_responses": answers,
                                                "fake_delay": 0, "fake_delay_jitter": 0})],
                           {}))
    state = State(inventory, Config())
    connect_all(state)
    add_deploy(state, deploy or vllm_container.install)
    host = inventory.get_host("@fake/tray-01")
    return planned_commands(state, host, (lambda command: command) if raw else command_text)


def test_a_tray_without_the_image_pulls_it_for_its_cpu_and_checks_what_came():
    plan = planned(docker_data(), image=None)
    (commands,) = plan.values()
    assert commands[0] == f"docker pull --quiet --platform linux/arm64 {SEED_IMAGE}"
    assert commands[1].startswith(f'test "$(docker image inspect --format {{{{.Architecture}}}} '
                                  f'{SEED_IMAGE})" = arm64 || {{ printf')


def test_a_tray_with_the_image_does_nothing():
    assert planned(docker_data(), image={"id": ARM_ID, "architecture": "arm64"}) == {}


def test_an_x86_image_on_a_tray_fails_the_operation_saying_why():
    plan = planned(docker_data(), image={"id": ARM_ID, "architecture": "amd64"})
    (commands,) = plan.values()
    assert len(commands) == 1 and commands[0].endswith(">&2 && exit 1")
    assert "built for linux/amd64, not this host" in commands[0]


def test_an_air_gapped_tray_gets_the_archive_pushed_and_loaded_once(tmp_path):
    archive = write_archive(tmp_path / "vllm.tar", SEED_IMAGE, "arm64")
    image_id = image_archive_info(str(archive))["image_id"]
    data = docker_data(vllm_image_tarball=str(archive))
    (commands,) = planned(data, image=None).values()
    assert commands[:3] == [
        "mkdir -p -m 0700 /var/lib/vllm-images && find /var/lib/vllm-images -maxdepth 1 "
        "-type f -name '*.staged' -delete",
        f"upload {archive} -> /var/lib/vllm-images/vllm.tar.staged",
        "docker load --quiet --input /var/lib/vllm-images/vllm.tar.staged && "
        "rm -f /var/lib/vllm-images/vllm.tar.staged"]
    assert f"= {image_id} ||" in commands[3]
    # The tag now names another image (an older load, a pull): load again.
    assert planned(data, image={"id": ARM_ID, "architecture": "arm64"})
    assert planned(data, image={"id": image_id, "architecture": "arm64"}) == {}


def docker_unit(systemd: int) -> list[str]:
    """The lines of the unit vllm_service.run uploads to a fake tray running ``systemd``."""
    def deploy():
        vllm_service.run(runtime=vllm_container.install())
    plan = planned(docker_data(), image={"id": ARM_ID, "architecture": "arm64"},
                   systemd=systemd, deploy=deploy, raw=True)
    (upload,) = [c for c in plan["Install vllm.service unit (docker runtime)"]
                 if isinstance(c, FileUploadCommand)]
    return upload.src.getvalue().splitlines()


def test_the_unit_runs_the_rendered_container_and_never_leaves_one_behind():
    settings = read_settings(FakeHost("tray-01", docker_data()))
    lines = docker_unit(systemd=255)
    argv = vllm_container.container_argv(settings, SEED_IMAGE,
                                         {**vllm_service.SERVICE_ENVIRONMENT,
                                          **settings.environment}, 90)
    assert f"ExecStart={systemd_exec_line(argv)}" in lines
    # vLLM drains for vllm_shutdown_timeout_s (60); docker and systemd allow its exit beyond.
    assert argv[-2:] == ["--shutdown-timeout", "60"]
    assert "Requires=docker.service" in lines and "Restart=always" in lines
    assert "ExecStartPre=-/usr/bin/docker rm --force vllm" in lines
    assert "ExecStop=/usr/bin/docker stop --time 90 vllm" in lines
    assert "ExecStopPost=-/usr/bin/docker rm --force vllm" in lines
    assert "TimeoutStopSec=120" in lines
    assert "RestartSteps=10" in lines and "RestartMaxDelaySec=300" in lines


def test_restart_backoff_only_where_systemd_knows_it():
    lines = docker_unit(systemd=252)
    assert "Restart=always" in lines and "RestartSec=10" in lines
    assert not any(line.startswith(("RestartSteps", "RestartMaxDelaySec")) for line in lines)


def test_archive_info_reads_the_oci_layout_of_newer_docker_save(tmp_path):
    """Docker 25+ saves an OCI layout: the config is blobs/sha256/<id>, without .json."""
    config = json.dumps({"architecture": "arm64", "os": "linux"}).encode()
    digest = hashlib.sha256(config).hexdigest()
    members = [(f"blobs/sha256/{digest}", config),
               ("oci-layout", b'{"imageLayoutVersion":"1.0.0"}'),
               ("manifest.json", json.dumps([{"Config": f"blobs/sha256/{digest}",
                                              "RepoTags": [SEED_IMAGE], "Layers": []}]).encode())]
    archive = tmp_path / "oci.tar"
    with tarfile.open(archive, "w") as tar:
        for name, content in members:
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    assert image_archive_info(str(archive)) == {
        "tags": [SEED_IMAGE], "image_id": f"sha256:{digest}", "architecture": "arm64",
        "os": "linux"}


# ---- restarts: only when what vLLM reads changed (planned on @fake) ---------------------------

def stat_answer(path: str, mode: str, size: int) -> str:
    """What `stat -c` prints for a root-owned file, in the format pyinfra's File fact asks."""
    return (f"user=root group=root mode={mode} atime=1700000000 mtime=1700000000 "
            f"ctime=1700000000 size={size} '{path}'")


def served_tray(data: dict, env_mode: str = "-rw-------", unit_mode: str = "-rw-r--r--",
                env_content: str | None = None, drop_ins: tuple = ()) -> dict:
    """Extra fake_responses: a tray where vllm.service runs, enabled, from the unit and the env
    file the deploy writes for ``data`` (``env_content`` unless None), with these modes, and
    ``drop_ins`` as SystemdDropIns finds them."""
    def deploy():
        vllm_service.run(runtime=vllm_container.install())
    bare = planned(data, image={"id": ARM_ID, "architecture": "arm64"}, deploy=deploy, raw=True)
    uploads = {command.dest: command.src.getvalue()
               for commands in bare.values() for command in commands
               if isinstance(command, FileUploadCommand)}
    unit = uploads[vllm_service.UNIT_PATH]
    env = vllm_service.env_file_content(read_settings(FakeHost("tray-01", data)).api_key) \
        if env_content is None else env_content
    answers = {
        fact_command(Directory, path="/etc/systemd/system"): [
            stat_answer("/etc/systemd/system", "drwxr-xr-x", 4096)],
        fact_command(File, path=ENV_FILE): [stat_answer(ENV_FILE, env_mode, len(env))],
        fact_command(Sha256File, path=ENV_FILE): [
            f"{hashlib.sha256(env.encode()).hexdigest()}  {ENV_FILE}"],
        fact_command(File, path=vllm_service.UNIT_PATH): [
            stat_answer(vllm_service.UNIT_PATH, unit_mode, len(unit))],
        fact_command(Sha1File, path=vllm_service.UNIT_PATH): [
            f"{hashlib.sha1(unit.encode()).hexdigest()}  {vllm_service.UNIT_PATH}"],
        "--property SubState vllm.service": ["Id=vllm.service", "SubState=running"],
        "--property UnitFileState vllm.service": ["Id=vllm.service", "UnitFileState=enabled"],
        fact_command(SystemdDropIns, unit="vllm.service"): list(drop_ins),
    }
    return answers


def service_plan(data: dict, answers: dict) -> dict:
    def deploy():
        vllm_service.run(runtime=vllm_container.install())
    return planned(data, image={"id": ARM_ID, "architecture": "arm64"}, deploy=deploy,
                   answers=answers)


START = vllm_service.RESTART_NAME
KEEP = "Keep the release that now serves as the last good one"
EARLY_MARK = (f"Mark a restart of vllm.service due ({vllm_service.RESTART_MARK}), if this run "
              "switches the weights or the runtime")
LATE_MARK = (f"Mark a restart of vllm.service due ({vllm_service.RESTART_MARK}) before its "
             "files change, if this run restarts it")


def test_a_served_tray_plans_nothing():
    data = docker_data()
    assert service_plan(data, served_tray(data)) == {}


def test_a_mode_only_fix_of_the_env_file_is_a_chmod_without_a_restart():
    data = docker_data()
    assert service_plan(data, served_tray(data, env_mode="-rw-r--r--")) == {
        f"Install vLLM secrets file {ENV_FILE}": [
            f"chown root:root {ENV_FILE} && chmod 0600 {ENV_FILE}"]}


def test_a_mode_only_fix_of_the_unit_neither_reloads_nor_restarts():
    data = docker_data()
    path = vllm_service.UNIT_PATH
    assert service_plan(data, served_tray(data, unit_mode="-rw-------")) == {
        "Install vllm.service unit (docker runtime)": [f"chmod 644 {path}"]}


def test_a_rotated_key_rewrites_the_env_file_and_restarts(tmp_path):
    key = tmp_path / "key"
    key.write_text("new-key\n")
    data = docker_data(vllm_api_key_file=str(key))
    plan = service_plan(data, served_tray(data, env_content=vllm_service.env_file_content(
        "old-key")))
    assert list(plan) == [LATE_MARK, f"Install vLLM secrets file {ENV_FILE}", START,
                          "Wait for vLLM /health", KEEP]
    assert plan[START] == ["systemctl restart vllm.service"]
    # A restart that fails its health wait puts the kept release back; one that passes keeps
    # itself as the last good release.
    assert "restoring the last good release from /var/lib/vllm-release" in \
        plan["Wait for vLLM /health"][0]
    probe = vllm_service.health_probe("http://127.0.0.1:8000/health")
    assert plan[KEEP] == [vllm_service.keep_release_script(
        "/opt/vllm/venv", probe, ["/raid/models/kimi-k2.6-nvfp4"]),
        f"rm -f {vllm_service.RESTART_MARK}"]


def test_a_run_killed_before_its_restart_leaves_a_mark_and_the_next_restarts_vllm():
    """Killed after it changed the unit (or the weights, the venv, the image) and before the
    restart, a run leaves the tray with nothing left to change: only the mark says vLLM still
    runs the old release. The plan restarts it, and the kept release clears the mark."""
    data = docker_data()
    marked = {fact_command(File, path=vllm_service.RESTART_MARK): [
        stat_answer(vllm_service.RESTART_MARK, "-rw-r--r--", 0)]}
    plan = service_plan(data, {**served_tray(data), **marked})
    assert list(plan) == [LATE_MARK, START, "Wait for vLLM /health", KEEP]
    # Reloaded first: the killed run may have written the unit and not reloaded systemd.
    assert plan[START] == ["systemctl daemon-reload", "systemctl restart vllm.service"]
    assert plan[KEEP][-1] == f"rm -f {vllm_service.RESTART_MARK}"


def test_a_restart_is_marked_due_before_the_first_change_it_needs_and_only_then(tmp_path):
    """Whether a mark's operation writes is decided when it runs, after vllm_service.run
    (later in the deploy file) has decided the restart (a --dry plan, made as the file is
    read, shows no change there): checked as pyinfra executes, the commands generated once
    the whole file is read. What switches in place (here an archive loaded under the unit's
    tag) is marked before the weights and the runtime; a rotated key just before the files
    change; a new tag after its pull, which the unit alone puts to use: a pull that fails
    (a tag no registry holds) leaves no mark, and the next run restarts nothing."""
    def deploy():
        due = vllm_service.mark_restart_due()
        vllm_service.run(runtime=vllm_container.install(), restart_due=due)
    key = tmp_path / "key"
    key.write_text("new-key\n")
    archive = write_archive(tmp_path / "vllm.tar", SEED_IMAGE, "arm64")
    served = served_tray(docker_data())
    cases = {  # data, and the changes expected, in order, up to the restart
        "nothing": (docker_data(), []),
        "rotated key": (docker_data(vllm_api_key_file=str(key)),
                        [LATE_MARK, f"Install vLLM secrets file {ENV_FILE}"]),
        "archive": (docker_data(vllm_image_tarball=str(archive)),
                    [EARLY_MARK, f"Image {SEED_IMAGE} present (loaded from vllm_image_tarball)"]),
        "new tag": (docker_data(vllm_image={"aarch64": "vllm/vllm-openai:v0.20.0-cu130"}),
                    ["Image vllm/vllm-openai:v0.20.0-cu130 present (pulled)", LATE_MARK,
                     "Install vllm.service unit (docker runtime)"]),
    }
    for case, (data, changes) in cases.items():
        image = None if case == "new tag" else {"id": ARM_ID, "architecture": "arm64"}
        plan = planned(data, image=image, deploy=deploy, answers={**served, **(
            served_tray(data, env_content=vllm_service.env_file_content("old-key"))
            if case == "rotated key" else {})})
        assert list(plan)[:len(changes)] == changes, case
        assert (START in plan) == bool(changes), case
        for mark in (EARLY_MARK, LATE_MARK):
            assert plan.get(mark) == ([f"touch {vllm_service.RESTART_MARK}"]
                                      if mark in changes else None), (case, mark)


def test_a_local_drop_in_is_removed_then_systemd_reloaded_and_vllm_restarted():
    data = docker_data()
    plan = service_plan(data, served_tray(data, drop_ins=(
        "/usr/lib/systemd/system/service.d/10-timeout-abort.conf "
        "/etc/systemd/system/vllm.service.d/override.conf",
        "/etc/systemd/system.control/vllm.service.d/50-RestartUSec.conf",
        "/etc/systemd/system/vllm.service.d/override.conf")))
    assert plan == {
        LATE_MARK: [f"touch {vllm_service.RESTART_MARK}"],
        "Remove local drop-ins of vllm.service": [
            "rm -f /etc/systemd/system.control/vllm.service.d/50-RestartUSec.conf "
            "/etc/systemd/system/vllm.service.d/override.conf && rmdir "
            "--ignore-fail-on-non-empty /etc/systemd/system.control/vllm.service.d "
            "/etc/systemd/system/vllm.service.d"],
        START: ["systemctl daemon-reload", "systemctl restart vllm.service"],
        "Wait for vLLM /health": plan["Wait for vLLM /health"],
        KEEP: plan[KEEP],
    }


def test_drop_ins_for_every_service_are_not_the_deploys_to_remove():
    data = docker_data()
    assert service_plan(data, served_tray(data, drop_ins=(
        "/usr/lib/systemd/system/service.d/10-timeout-abort.conf "
        "/etc/systemd/system/service.d/restart.conf",))) == {}
