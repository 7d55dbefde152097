"""Read-only checks that stop a deploy before its first change.

The checks are a pure function of (host data, host facts), `host_problems`, so they are tested
as data; the @deploy gathers the facts and turns problems into a failing first operation.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pyinfra import host, logger
from pyinfra.api import deploy, operation

from tasks import facts_together, system, vllm_container
from tasks.data_keys import IMAGE_ARCH, DataError, Problem
from tasks.facts import DockerImage, NvidiaGpus, NvidiaSmiInfo, PreflightState
from tasks.operations import failing_command
from tasks.settings import UNIT_NAME, Settings, read_settings, wheelhouse_platform

# GPUs whose trays sit on an NVLink fabric (GB200/GB300 NVL72): their fabric must be up.
NVL_GPU_MARKERS = ("GB200", "GB300")


@dataclass(frozen=True)
class HostFacts:
    """What the checks need to know about a host, gathered once."""

    gpus: list[dict] = field(default_factory=list)  # tasks.facts.NvidiaGpus
    smi: dict = field(default_factory=dict)  # tasks.facts.NvidiaSmiInfo
    arch: str = "x86_64"
    python: str | None = None  # tasks.facts.PythonVersion: what the host's python3 is
    weights_free: dict | None = None  # tasks.facts.FreeBytes(weights_dir)
    weights_present_bytes: int = 0  # bytes already in the model folder
    listening: list[dict] = field(default_factory=list)  # tasks.facts.ListeningTcpPorts
    service_pid: int | None = None  # MainPID of vllm.service, when running
    docker_image: dict | None = None  # tasks.facts.DockerImage of the host's vllm_image


def needs_gpus(settings: Settings) -> bool:
    return settings.profile.min_gpu_memory_gb > 0


def gpu_memory_problem(settings: Settings, used: list[dict]) -> str | None:
    """The line refusing the tensor parallel GPUs ``used`` as too small for the model, or None.

    Under the profile's minimum (the weights plus the KV cache vLLM's recipe asks for) refuses
    unless preflight_accept_low_gpu_memory; weights larger than the usable memory refuse
    always: that override accepts a tight KV cache, and no KV cache makes the weights fit.
    """
    name, profile = settings.host_name, settings.profile
    tp = len(used)
    # vLLM's own default when the profile leaves it unset.
    utilisation = settings.gpu_memory_utilization or 0.9
    total_mib = sum(gpu["memory_total_mib"] for gpu in used)
    usable_gb = total_mib / 1024 * utilisation
    if usable_gb < profile.min_gpu_memory_gb and not settings.accept_low_gpu_memory:
        per_gpu = used[0]["memory_total_mib"] / 1024
        seed_note = (
            " The seed ran Kimi-K2.6 INT4 on 4 x GB200 this way with a tight KV cache: "
            "set preflight_accept_low_gpu_memory = True to do the same, or choose "
            "model_profile kimi-k2.6-nvfp4 (600 GB) on Blackwell."
            if profile.name == "kimi-k2.6" else "")
        return (f"{name}: vllm_gpu_memory_utilization: found {usable_gb:.0f} GB usable "
                f"({tp} x {per_gpu:.0f} GB x {utilisation:.2f}); need "
                f">= {profile.min_gpu_memory_gb} GB for {profile.name}.{seed_note}")
    # In bytes, as the weights are counted: the units cannot tip the verdict.
    usable_bytes = total_mib * 2**20 * utilisation
    if settings.weights_bytes <= usable_bytes:
        return None
    override_note = (" (preflight_accept_low_gpu_memory accepts a tight KV cache, not weights "
                     "that do not fit)" if settings.accept_low_gpu_memory else "")
    per_gpu_bytes = used[0]["memory_total_mib"] * 2**20
    return (f"{name}: vllm_tensor_parallel_size: found {tp} x {per_gpu_bytes / 1e9:.0f} GB x "
            f"{utilisation:.2f} = {usable_bytes / 1e9:.0f} GB usable; need "
            f">= {settings.weights_bytes / 1e9:.0f} GB to hold {profile.name}'s weights"
            f"{override_note}")


def host_problems(settings: Settings, facts: HostFacts) -> list[str]:
    """Every reason this host cannot take the deploy, one line each: host, key, found, need."""
    problems = _gpu_problems(settings, facts) if needs_gpus(settings) else []
    if settings.runtime == "venv":
        problems += wheelhouse_problems(settings.host_name, "vllm_wheelhouse_dir",
                                        "wheelhouse", settings.wheelhouse_platform, facts)
    if settings.runtime == "docker":
        problems += image_problems(settings, facts)
    return problems + _disk_problems(settings, facts) + _port_problems(settings, facts)


def _gpu_problems(settings: Settings, facts: HostFacts) -> list[str]:
    """Enough GPUs for tensor parallel, memory for the weights, no MIG, the driver branch, and
    the fabric up on NVL trays."""
    name, tp, gpus = settings.host_name, settings.tensor_parallel_size, facts.gpus
    problems = []
    if tp > len(gpus):
        problems.append(Problem(name, "vllm_tensor_parallel_size", f"{len(gpus)} visible GPU(s)",
                                f"at least {tp} for tensor parallel {tp} (model_profile "
                                f"{settings.profile.name})"))
    else:
        used = gpus[:tp]
        memory = gpu_memory_problem(settings, used)
        if memory:
            problems.append(memory)
        mig = [gpu["index"] for gpu in used if gpu.get("mig")]
        if mig:
            problems.append(Problem(name, "GPUs", f"MIG enabled on GPU {mig}",
                                    "MIG disabled for tensor parallel"))
    # With nvidia_driver_install on, tasks/nvidia.py brings the driver up to the branch.
    drivers = set() if settings.driver_install else {gpu["driver"] for gpu in gpus}
    for driver in sorted(drivers):
        if int(driver.split(".")[0]) < settings.driver_min_branch:
            problems.append(Problem(name, "nvidia_driver_min_branch", f"driver {driver}",
                                    f"branch >= {settings.driver_min_branch} (CUDA 13 builds "
                                    "of vLLM)"))
    if any(marker in gpu["name"] for gpu in gpus for marker in NVL_GPU_MARKERS):
        states = {gpu.get("fabric_state") for gpu in facts.smi.get("gpus", [])}
        if states != {"Completed"}:
            problems.append(Problem(name, "GPU fabric", f"state {sorted(map(str, states))} on "
                                    "an NVL tray", "Completed on every GPU (check nvidia-imex "
                                    "/ the ComputeDomain)"))
    return [str(item) for item in problems]


def _disk_problems(settings: Settings, facts: HostFacts) -> list[str]:
    if not facts.weights_free:  # None, or {} where df printed nothing: unknown, not full
        return []
    needed = max(settings.weights_bytes - facts.weights_present_bytes, 0)
    free = facts.weights_free["free_bytes"]
    if needed <= free:
        return []
    return [str(Problem(settings.host_name, "weights_dir",
                        f"{free / 1e9:.1f} GB free on {facts.weights_free['mount']} for "
                        f"{settings.model_dir}",
                        f"{needed / 1e9:.1f} GB more for the weights not yet present"))]


def _port_problems(settings: Settings, facts: HostFacts) -> list[str]:
    """The serving port free, or held by vllm.service itself."""
    # A pod listens in its own network namespace: the node's port is not the server's.
    listening = facts.listening if settings.runtime != "kubernetes" else []
    for listener in listening:
        ours = listener["pid"] is not None and listener["pid"] == facts.service_pid
        # The docker runtime's port is held by Docker's proxy on behalf of the running unit.
        ours = ours or (settings.runtime == "docker" and facts.service_pid is not None
                        and listener["process"] == "docker-proxy")
        if listener["port"] == settings.port and not ours:
            owner = listener["process"] or "an unknown process"
            if listener["pid"]:
                owner += f" (pid {listener['pid']})"
            return [str(Problem(settings.host_name, "vllm_port",
                                f"port {settings.port} held by {owner}",
                                f"a free port, or one held by {UNIT_NAME}"))]
    return []


def kubernetes_problems(settings: Settings, groups: list[str],
                        control_hosts: dict[str, str | None]) -> list[str]:
    """The kubernetes runtime leaves serving to a host of group k8s_control, which applies the
    objects for the nodes of its k8s_node_group: without one for this host's groups, the host
    would fetch the weights and nothing would ever serve them.

    + groups: this host's inventory groups
    + control_hosts: every k8s_control host of the inventory -> its k8s_node_group
    """
    if settings.runtime != "kubernetes":
        return []
    name = settings.host_name
    if not control_hosts:
        return [f"{name}: vllm_runtime: found 'kubernetes' and no host in group k8s_control; "
                "need a k8s_control host that applies the objects (inventories/gb200.py: "
                "k8s_control = _k8s_control_example), or vllm_runtime 'docker'"]
    node_groups = sorted({str(group) for group in control_hosts.values()})
    if set(node_groups) & set(groups):
        return []
    return [f"{name}: vllm_runtime: found 'kubernetes' on a host of group(s) {sorted(groups)}, "
            f"and k8s_control host(s) {sorted(control_hosts)} apply objects for k8s_node_group "
            f"{node_groups} only; need this host in one of those groups, or their "
            "k8s_node_group set to one of this host's"]


def wheelhouse_problems(name: str, key: str, tool: str, platform: dict[str, str],
                        facts: HostFacts) -> list[str]:
    """A wheelhouse (its lock's `arch=` and `python=`) the host cannot install: binary wheels
    are built for one CPU and one Python; pip would fail half-way through the deploy."""
    problems = []
    if platform.get("arch") not in (None, facts.arch):
        problems.append(f"{name}: {key}: found wheels built for {platform['arch']}; need wheels "
                        f"for this host's {facts.arch} CPU ({tool} --arch {facts.arch})")
    if platform.get("python") not in (None, facts.python) and facts.python is not None:
        problems.append(f"{name}: {key}: found wheels for Python {platform['python']}; need "
                        f"wheels for this host's python3 {facts.python} ({tool} --python-version "
                        f"{facts.python})")
    return problems


def image_problems(settings: Settings, facts: HostFacts) -> list[str]:
    """The docker runtime's checks: an image named for this CPU, of this CPU's architecture
    (a bare tag can be x86-only: on Grace it fails at every start with exec format error),
    and a way to hand the GPUs to it."""
    name = settings.host_name
    reference = settings.image_for(facts.arch)
    wanted = IMAGE_ARCH.get(facts.arch, facts.arch)
    if reference is None:
        return [f"{name}: vllm_image: found no entry for this host's {facts.arch} CPU "
                f"(entries: {sorted(settings.images)}); need an image built for linux/{wanted}"]
    problems = []
    archive = settings.image_archive
    if archive is not None and archive["architecture"] != wanted:
        problems.append(
            f"{name}: vllm_image_tarball: found an image for {archive['os']}/"
            f"{archive['architecture']} in {settings.image_tarball}; need one for this "
            f"host's linux/{wanted}")
    elif (archive is None and facts.docker_image is not None
          and facts.docker_image["architecture"] != wanted):
        problems.append(
            f"{name}: vllm_image: found {reference} on the host built for "
            f"{facts.docker_image['os']}/{facts.docker_image['architecture']}; need "
            f"linux/{wanted}: pin a tag published for it (`docker manifest inspect "
            f"{reference}` lists a tag's platforms) and `docker rmi` this one")
    if needs_gpus(settings) and settings.container_gpus == "none":
        problems.append(f"{name}: vllm_container_gpus: found 'none' for {settings.profile.name}, "
                        "which needs GPUs; need 'gpus' or 'cdi'")
    return problems


@operation()
def preflight_passed(problems: list[str], checks: str):
    """
    Fail, printing every problem, when there are any; otherwise change nothing.

    + problems: one line each
    + checks: what was checked, for the no-change message
    """
    if not problems:
        host.noop(f"preflight passed: {checks}")
        return
    message = "preflight refused the deploy:\n" + "\n".join(problems) + "\n"
    yield failing_command(message)


def _hub_settings(settings: Settings):
    """(the Hub client's settings, None) on the Hub path, (None, the DataError) when its data
    is wrong, (None, None) on the push path. (A weights_hf_token_command runs once per run
    whoever asks: tasks/secrets.py.)"""
    if settings.model_source_dir is not None:
        return None, None
    # Imported here: tasks.weights imports this module's siblings at load time.
    from tasks import weights_hub
    try:
        return weights_hub.read_hub_settings(host.name, host.data), None
    except DataError as error:
        return None, error


def next_steps_facts(settings: Settings, hub) -> list[tuple[type, dict]]:
    """The facts the steps after this one read on a host where all is in place: the system
    step's and the weights step's, on the Hub path (``hub``: tasks.weights_hub.HubSettings;
    they include the weights folders this step reads too) or the push path (``hub`` None)."""
    # Imported here: tasks.weights imports this module's siblings at load time.
    from tasks import weights
    wanted = system.facts_read(settings)
    try:
        wanted += weights.facts_read(settings, hub)
    except DataError:  # the hf CLI's data: reported by _problems; the folders still read
        wanted += [weights.tree_fact(target) for target in weights.targets(settings, hub)]
    return wanted


def gather(settings: Settings, hub=None) -> HostFacts:
    # One command for the facts every host is asked (tasks.facts.PreflightState), the GPU
    # facts where the model needs GPUs, and those the next steps read
    # (tasks/facts_together.py): a host where all is in place is asked that one command by the
    # whole of preflight, system and weights. The image on the docker runtime is a second,
    # as its name depends on the CPU; the image step reads that answer again.
    asked = {"unit": UNIT_NAME, "model_dir": settings.model_dir,
             "weights_dir": settings.weights_dir}
    gpu_facts = [(NvidiaGpus, {}), (NvidiaSmiInfo, {})] if needs_gpus(settings) else []
    facts_together.ask_together(host, [(PreflightState, asked), *gpu_facts,
                                       *next_steps_facts(settings, hub)])
    state = host.get_fact(PreflightState, **asked)
    pid, present, arch = state["service_pid"], state["model_bytes"], state["arch"]
    gpus = host.get_fact(NvidiaGpus) if gpu_facts else []
    reference = settings.image_for(arch) if settings.runtime == "docker" else None
    if reference:
        facts_together.ask_together(host, vllm_container.facts_read(reference))
    return HostFacts(
        gpus=gpus,
        smi=host.get_fact(NvidiaSmiInfo) if gpus else {},
        arch=arch,
        python=state["python"],
        weights_free=state["weights_free"],
        weights_present_bytes=int(present or 0),
        listening=state["listening"],
        service_pid=int(pid) if pid and pid != "0" else None,
        docker_image=host.get_fact(DockerImage, reference=reference) if reference else None,
    )


def _problems(settings: Settings) -> list[str]:
    """What the host's facts, the inventory and the Hub say against data that is valid."""
    hub, hub_error = _hub_settings(settings)
    facts = gather(settings, hub)
    problems = host_problems(settings, facts)
    control_hosts = {control.name: control.data.get("k8s_node_group")
                     for control in host.inventory.get_group("k8s_control", [])}
    problems += kubernetes_problems(settings, [str(group) for group in host.groups],
                                    control_hosts)
    if settings.model_source_dir is None:
        # Imported here: tasks.weights imports this module's siblings at load time.
        from tasks import hf_cli, weights
        try:
            _, _, hf_wheelhouse = hf_cli.read_hf_cli_settings(host.name, host.data)
            problems += wheelhouse_problems(
                host.name, "hf_cli_wheelhouse_dir", "hf-wheelhouse",
                wheelhouse_platform(hf_wheelhouse), facts)
            if hub_error is not None:
                raise hub_error
            problems += weights.problems(host, settings, hub)
        except DataError as error:
            problems += [str(item) for item in error.problems]
    return problems


@deploy("Preflight")
def check() -> bool:
    """Refuse, before anything on any host changes, what cannot work; True when all passed.

    Reads every data key (tasks.settings.read_settings), the host's GPUs, free space on
    weights_dir, listening ports and architecture, and for the kubernetes runtime the
    inventory's k8s_control hosts; on a router host, tasks.vllm_router.router_problems
    instead (one operation for every host). Each problem is one line naming the host, the data key,
    what was found and what is needed; all are reported at once, logged while planning (so
    `--dry` shows them) and raised by this deploy's first operation, which stops the run on
    every host before any change (config.FAIL_PERCENT = 0).
    """
    if "router" in host.groups:
        # Imported here: tasks.vllm_router imports this module.
        from tasks.vllm_router import router_problems
        problems = router_problems(host)
    else:
        try:
            settings = read_settings(host)
        except DataError as error:
            problems = [str(item) for item in error.problems]
        else:
            problems = _problems(settings)
    for line in problems:
        logger.warning(f"preflight: {line}")
    preflight_passed(name="Check data, GPUs, disk and port", problems=problems,
           checks="data, GPUs, weights disk space, serving port")
    return not problems
