"""The kubernetes runtime: the seed's objects (section 4.1), applied from a host of group
k8s_control (a bastion with kubectl and a kubeconfig).

The serving nodes still get the preflight, their packages and the weights on /raid from the
rest of the deploy: the Deployment mounts those folders (hostPath, as the seed). What the
cluster runs is rendered from the NODES' data, not the control host's: `tasks.settings.read_settings`
of every host of `k8s_node_group`, through `tasks/k8s_manifests.py`, so the container's argv is
the one renderer's with the pod's mount paths. One Deployment serves them all, so every node
must render the same objects; two that disagree stop the run, naming both. The pod is pinned to
those nodes (required node affinity on their `k8s_node_name`), the ones this deploy filled with
the weights. The Hub token stays on the nodes that download: the pod runs offline, and neither
the Secret nor the container ever holds it. With vllm_tls_* data the nodes' certificate, key
and CA go into the same Secret, mounted read-only into the pod (tasks/k8s_manifests.py); a new
certificate changes the Secret alone, and so restarts the pod once.

The rendered objects are kept on the control host (secret.yaml root 0600 from its creation,
so `kubectl` reads the secret values from a file, never from a command line). Only when one of
them changes does `kubectl apply --server-side` run, followed by `kubectl rollout status`
bounded by the Deployment's own progress deadline (the startup probe's window plus time to
schedule and pull); an unchanged run yields no command at all.
"""

from __future__ import annotations

import dataclasses
import io
import posixpath
import shlex

from pyinfra import host, logger
from pyinfra.api import QuoteString, StringCommand, deploy, operation
from pyinfra.operations import files

from tasks import data_keys
from tasks.data_keys import NODE_NAME, DataError, Problem, problem
from tasks.facts import KubernetesObjectsDiffer
from tasks.inventory_check import CONNECTOR_PREFIX
from tasks.k8s_manifests import (DRAFT_MOUNT, MANIFESTS, MODEL_MOUNT, ManifestValues,
                                 ManifestValuesError, render_manifests, rollout_deadline_s)
from tasks.operations import secret_file_present
from tasks.settings import Settings, read_settings

SECRET_MANIFEST = "secret.yaml"
# GB200 trays are Grace (aarch64): the image for that architecture, as the docker runtime
# picks it by `uname -m`; the Deployment's nodeSelector asks for kubernetes.io/arch: arm64.
NODE_ARCH = "aarch64"
# Which data keys feed each input of the objects, to name them when two nodes disagree.
_VALUE_KEYS = {
    "serve_args": "model_*, vllm_host, vllm_port, vllm_tensor_parallel_size, "
                  "vllm_gpu_memory_utilization, vllm_extra_args",
    "model_volume": "weights_dir, model_profile",
    "draft_volume": "weights_dir, model_profile, model_speculative",
    "model_sub_path": "model_profile",
    "draft_sub_path": "model_profile, model_speculative",
    "checkpoint_size_bytes": "model_profile, model_source_dir",
    "load_bytes_per_s": "vllm_load_bytes_per_s",
    "image": "vllm_image",
    "image_digest": "vllm_image",
    "environment": "vllm_environment, vllm_cpu_threads_bind",
    "service_port": "vllm_port",
    "api_key": "vllm_api_key_file, vllm_api_key_command",
    "tls": "vllm_tls_cert_file, vllm_tls_key_file, vllm_tls_ca_file",
}


@dataclasses.dataclass(frozen=True)
class KubernetesSettings:
    """A control host's k8s_* data, checked."""

    node_group: str
    namespace: str
    name: str
    volume_type: str
    model_claim: str | None
    draft_claim: str | None
    service_type: str
    node_port: int
    manifest_dir: str
    kubectl: tuple[str, ...]  # the command's words, --kubeconfig appended when set
    field_manager: str

    def path(self, manifest: str) -> str:
        return f"{self.manifest_dir}/{manifest}"


def read_kubernetes_settings(host_name: str, data) -> KubernetesSettings:
    """The k8s_* keys of the control host's data, checked (tasks/data_keys.py), with the rules
    the volume type adds; DataError holds every problem."""
    problems = data_keys.check(host_name, data)
    values = {key: data.get(key) for key in data_keys.BY_NAME}
    volume_type = values["k8s_volume_type"]
    for key in ("k8s_model_claim", "k8s_draft_claim"):
        if volume_type == "hostPath" and values[key] is not None:
            problems.append(problem(host_name, key, values[key], "None with k8s_volume_type "
                                    "hostPath (the pod mounts the nodes' weights_dir)"))
    if volume_type == "persistentVolumeClaim" and values["k8s_model_claim"] is None:
        problems.append(problem(host_name, "k8s_model_claim", None, "the claim holding a "
                                "folder per model (required with k8s_volume_type "
                                "persistentVolumeClaim)"))
    if problems:
        raise DataError(problems)
    kubectl = shlex.split(values["k8s_kubectl"])
    if values["k8s_kubeconfig"] is not None:
        kubectl.append(f"--kubeconfig={values['k8s_kubeconfig']}")
    return KubernetesSettings(
        node_group=values["k8s_node_group"], namespace=values["k8s_namespace"],
        name=values["k8s_name"], volume_type=volume_type,
        model_claim=values["k8s_model_claim"], draft_claim=values["k8s_draft_claim"],
        service_type=values["k8s_service_type"], node_port=values["k8s_node_port"],
        manifest_dir=values["k8s_manifest_dir"].rstrip("/"), kubectl=tuple(kubectl),
        field_manager=values["k8s_field_manager"])


def node_names(nodes) -> tuple[str, ...]:
    """The Kubernetes node names of `nodes` (k8s_node_group's hosts): each host's
    k8s_node_name, else its inventory name without a connector's `@name/` prefix. Raises
    DataError naming the host and the key for a name no node can carry, or one two hosts share.
    """
    names, problems, owner = [], [], {}
    for node in nodes:
        given = node.data.get("k8s_node_name")
        name = given if given is not None else CONNECTOR_PREFIX.sub("", node.name)
        if not isinstance(name, str) or not NODE_NAME.match(name):
            default = "" if given is not None else f" (its inventory name, {name!r}, is none)"
            problems.append(problem(node.name, "k8s_node_name", given,
                                    data_keys.BY_NAME["k8s_node_name"].need + default))
        elif name in owner:
            problems.append(problem(node.name, "k8s_node_name", given, f"a node of its own "
                                    f"({owner[name]} is node {name!r} too)"))
        else:
            owner[name] = node.name
            names.append(name)
    if problems:
        raise DataError(problems)
    return tuple(names)


def node_values(config: KubernetesSettings, node, settings: Settings,
                pinned_to: tuple[str, ...]) -> ManifestValues:
    """What one node's data renders the objects from, the pod pinned to the nodes
    `pinned_to` (node_names of the group). Raises DataError naming the node for data only this
    runtime reads (vllm_runtime, vllm_image), and ValueError from ManifestValues for values
    the objects cannot hold.

    The checkpoint size is the model's alone: the catalog knows no size for the EAGLE-3 draft
    (a few GB next to Kimi-K2.6's 595), and the startup window's factor of two covers it.
    """
    problems = []
    if settings.runtime != "kubernetes":
        problems.append(problem(node.name, "vllm_runtime", settings.runtime, f"kubernetes on "
                                f"every node of {config.node_group} (else the node also runs "
                                "vllm.service on the GPUs the pod asks for)"))
    image = settings.image_for(NODE_ARCH)
    if image is None:
        problems.append(problem(node.name, "vllm_image", settings.images,
                                f"an {NODE_ARCH!r} image (GB200 nodes are arm64)"))
    if problems:
        raise DataError(problems)
    if config.volume_type == "hostPath":
        volumes = {"model_volume": settings.model_dir, "draft_volume": settings.draft_dir}
    else:
        # One claim holding a folder per model, named as under weights_dir on a node.
        draft_claim = config.draft_claim or config.model_claim
        volumes = {"model_volume": config.model_claim,
                   "model_sub_path": posixpath.basename(settings.model_dir),
                   "draft_volume": draft_claim if settings.draft_dir else None,
                   "draft_sub_path": (posixpath.basename(settings.draft_dir)
                                      if settings.draft_dir else None)}
    name, _, digest = image.partition("@")
    return ManifestValues(
        serve_args=settings.serve_args_at(
            model_path=MODEL_MOUNT, draft_path=DRAFT_MOUNT if settings.draft_dir else None),
        checkpoint_size_bytes=settings.weights_bytes,
        load_bytes_per_s=node.data.get("vllm_load_bytes_per_s"),
        volume_type=config.volume_type, name=config.name, namespace=config.namespace,
        image=name, image_digest=digest or None, environment=dict(settings.environment),
        node_names=pinned_to, service_type=config.service_type, service_port=settings.port,
        node_port=config.node_port, api_key=settings.api_key, tls=settings.tls, **volumes)


def _difference(field: dataclasses.Field, first, second) -> str:
    """How one input differs between two nodes, secret values left unshown."""
    if not field.repr:
        return "the values differ (secret: not shown)"
    if isinstance(first, tuple) and isinstance(second, tuple):
        only_first = [word for word in first if word not in second]
        only_second = [word for word in second if word not in first]
        if only_first or only_second:
            return f"{only_first} only on the first, {only_second} only on the second"
        return "the same words in another order"
    return f"{first!r} vs {second!r}"


def _disagreements(first_name: str, first: ManifestValues, name: str, values: ManifestValues,
                   group: str) -> list[Problem]:
    """One problem per input on which node `name` renders other objects than `first_name`."""
    return [Problem(name, _VALUE_KEYS.get(field.name, "k8s_*"),
                    f"{field.name}: "
                    + _difference(field, getattr(first, field.name), getattr(values, field.name)),
                    f"the same as on {first_name}: one Deployment serves every node of group "
                    f"{group}, so their data must agree")
            for field in dataclasses.fields(ManifestValues)
            if getattr(first, field.name) != getattr(values, field.name)]


def desired_values(control, config: KubernetesSettings) -> ManifestValues:
    """The one set of values every node of `config.node_group` renders the objects from.
    Raises DataError naming the control host when the group is empty, a node and its
    k8s_node_name when that cannot pin the pod, the nodes and the inputs when two nodes
    disagree, and the control host when the values cannot be rendered.
    """
    nodes = control.inventory.get_group(config.node_group, [])
    if not nodes:
        raise DataError([problem(control.name, "k8s_node_group", config.node_group,
                                 "an inventory group holding the GPU nodes (this inventory "
                                 "has no host in it)")])
    pinned_to = node_names(nodes)
    rendered = []
    for node in nodes:
        try:
            rendered.append((node, node_values(config, node, read_settings(node), pinned_to)))
        except ManifestValuesError as error:
            raise DataError([Problem(control.name, f"the Kubernetes objects from {node.name}'s "
                                     "data", line, "values the objects can hold")
                             for line in error.problems]) from error
    (first_node, first), others = rendered[0], rendered[1:]
    for node, values in others:
        if values == first:
            continue
        raise DataError(_disagreements(first_node.name, first, node.name, values,
                                       config.node_group))
    return first


def kubectl_apply_command(config: KubernetesSettings) -> StringCommand:
    """`kubectl apply --server-side` of every rendered file, in apply order."""
    arguments = [*config.kubectl, "apply", "--server-side",
                 # The objects are owned by this deploy (their templates say so): a field
                 # someone changed by hand is taken back instead of stopping the apply.
                 "--force-conflicts", f"--field-manager={config.field_manager}",
                 "-n", config.namespace]
    for manifest in MANIFESTS:
        arguments += ["-f", config.path(manifest)]
    return StringCommand(*(QuoteString(argument) for argument in arguments))


def rollout_script(config: KubernetesSettings, timeout_s: int) -> str:
    """`kubectl rollout status` bounded by `timeout_s`; on failure it prints what the
    Deployment, its pods (their events: scheduling, GPU claim, image pull, probes) and vLLM's
    last log lines say, then fails."""
    kubectl = shlex.join([*config.kubectl, "-n", config.namespace])
    deployment = f"deployment/{config.name}"
    selector = shlex.quote(f"app={config.name}")
    return (
        f"{kubectl} rollout status {deployment} --timeout={int(timeout_s)}s || {{ "
        f"echo '{deployment} in namespace {config.namespace} did not roll out within "
        f"{int(timeout_s)}s (its progress deadline); what Kubernetes says:' >&2; "
        f"{kubectl} get deployment,replicaset,pod -l {selector} -o wide >&2; "
        f"{kubectl} describe pod -l {selector} 2>&1 | tail -n 40 >&2; "
        f"echo 'last lines of vLLM:' >&2; "
        f"{kubectl} logs {deployment} --all-containers --tail=40 >&2; exit 1; }}")


@operation(is_idempotent=False)
def objects_applied(config: KubernetesSettings, timeout_s: int, restart: bool = False,
                    when: bool = True):
    """
    Apply the rendered objects with server-side apply and wait for the Deployment to roll out;
    on timeout fail with the Deployment's and its pods' state and vLLM's last log lines.

    + config: the control host's checked k8s_* data (kubectl, namespace, name, files)
    + timeout_s: seconds `kubectl rollout status` waits (the Deployment's progress
      deadline, tasks.k8s_manifests.rollout_deadline_s)
    + restart: restart the Deployment's pod after the apply (pass whether the Secret changed
      while the Deployment did not: a pod reads its Secret only when it starts)
    + when: apply only if True (pass whether any object file changed, so an unchanged
      control host yields no command)

    **Example:**

    .. code:: python

        objects_applied(name="Apply the Kubernetes objects", config=config, timeout_s=1790,
                        when=any(op.will_change for op in uploads))
    """
    if not when:
        host.noop(f"the objects in {config.manifest_dir} are unchanged; nothing to apply")
        return
    yield kubectl_apply_command(config)
    if restart:
        yield StringCommand(*(QuoteString(argument) for argument in (
            *config.kubectl, "-n", config.namespace, "rollout", "restart",
            f"deployment/{config.name}")))
    yield StringCommand("sh", "-c", QuoteString(rollout_script(config, timeout_s)))


@deploy("vLLM on Kubernetes")
def apply() -> None:
    """Converge the cluster to run vLLM as the seed's objects, rendered from the data of the
    nodes of k8s_node_group: the object files on this (control) host, applied and rolled out
    only when one of them changed.

    Data keys (this host): k8s_node_group, k8s_namespace, k8s_name, k8s_volume_type,
    k8s_model_claim, k8s_draft_claim, k8s_service_type, k8s_node_port, k8s_manifest_dir,
    k8s_kubectl, k8s_kubeconfig, k8s_field_manager. From the nodes: those tasks.settings
    renders into the command line and the environment, vllm_image, vllm_load_bytes_per_s,
    vllm_api_key_file, k8s_node_name.
    """
    config = read_kubernetes_settings(host.name, host.data)
    nodes = host.inventory.get_group(config.node_group, [])
    if nodes and not any(node.data.get("vllm_runtime") == "kubernetes" for node in nodes):
        # A bastion listed for later, say: nothing to render while the nodes serve themselves.
        logger.info(f"{host.name}: no host of group {config.node_group} has vllm_runtime "
                    "kubernetes; no Kubernetes objects to apply")
        return
    values = desired_values(host, config)
    manifests = render_manifests(values)
    # 0755: only secret.yaml is secret, and it is 0600 from the moment it exists.
    files.directory(name=f"Create Kubernetes objects folder {config.manifest_dir}",
                    path=config.manifest_dir, user="root", group="root", mode="755")
    uploads = {}
    for manifest, text in manifests.items():
        path = config.path(manifest)
        if manifest == SECRET_MANIFEST:
            # Never files.put: it would show the values with --diff and chmod after writing.
            uploads[manifest] = secret_file_present(name=f"Install Kubernetes Secret {path}",
                                            dest=path, content=text)
        else:
            uploads[manifest] = files.put(
                name=f"Install Kubernetes object {path}", src=io.StringIO(text), dest=path,
                user="root", group="root", mode="644", create_remote_dir=False)
    files_change = any(upload.will_change for upload in uploads.values())
    # Unchanged files, but is the cluster still what they say? (a hand edit, a scale, a
    # deleted object): then apply them again, and the drift check sees it as a change.
    cluster_differs = not files_change and cluster_drifted(config)
    objects_applied(
        name=f"Apply the Kubernetes objects, wait for deployment/{config.name} to roll out",
        config=config,
        timeout_s=rollout_deadline_s(values.checkpoint_size_bytes, values.load_bytes_per_s),
        restart=(uploads[SECRET_MANIFEST].will_change
                 and not uploads["deployment.yaml"].will_change),
        when=files_change or cluster_differs)


def cluster_drifted(config: KubernetesSettings) -> bool:
    """True when the cluster's objects differ from the files kept on this host
    (`kubectl diff --server-side`); a diff that cannot run is logged and counts as no drift,
    for the files are what this host can vouch for."""
    differs = host.get_fact(KubernetesObjectsDiffer, kubectl=list(config.kubectl),
                            namespace=config.namespace, field_manager=config.field_manager,
                            files=[config.path(manifest) for manifest in MANIFESTS])
    if differs is None:
        logger.warning(f"{host.name}: kubectl diff could not compare the cluster with "
                       f"{config.manifest_dir} (no cluster access?); applying only on a "
                       "changed file")
    elif differs:
        logger.info(f"{host.name}: the cluster's objects differ from {config.manifest_dir}: "
                    "applying them again")
    return bool(differs)
