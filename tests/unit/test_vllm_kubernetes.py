"""tasks/vllm_kubernetes.py: what `apply` plans on the k8s_control host, from the nodes' data.

No Kubernetes API server can run on these machines, so pyinfra's ``@fake`` connector stands in
for the control host (and the two GB200 nodes whose data the objects come from): each fact
command gets the answer a control host in the case's state would print, and the test reads the
commands each operation would run. The objects themselves are validated against the Kubernetes
1.34/1.35 schemas and lined up against the seed in tests/unit/test_k8s_manifests.py; here the
subject is which files change, what kubectl runs, and when nothing runs at all. The rollout
script's failure path is run for real against a stub kubectl.
"""

from __future__ import annotations

import base64
import hashlib
import json
import subprocess

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from pyinfra.api import Config, FileUploadCommand, Inventory, State, StringCommand
from pyinfra.api.connect import connect_all
from pyinfra.api.deploy import add_deploy
from pyinfra.api.operations import run_ops
from pyinfra.context import ctx_host, ctx_state
from pyinfra.facts.files import Directory, File, Sha1File, Sha256File

from tasks import vllm_kubernetes
from tasks.facts import KubernetesObjectsDiffer
from tasks.k8s_manifests import (DRAFT_MOUNT, MANIFESTS, MODEL_MOUNT, rollout_deadline_s,
                                 startup_probe_window_s)
from tasks.data_keys import DataError
from tasks.settings import OFFLINE_ENVIRONMENT, read_settings
from tasks.vllm_kubernetes import node_names, read_kubernetes_settings, rollout_script
from tasks.inventory_check import address_of
from tests.helpers import FakeHost, fact_command, group_data, planned_commands
from tests.unit.test_tls import certificate, pem

NODES = ("@fake/tray-01", "@fake/tray-02")
CONTROL = "@fake/bastion"
DIR = "/etc/vllm-kubernetes"
# Recognisable stand-ins, so a leak into any command can be searched for.
API_KEY = "sk-test-9a7c3e1f5b2d4608"
HF_TOKEN = "hf_testTokenValue5e2b7a9c"
FAKE = {"fake_delay": 0, "fake_delay_jitter": 0}

NAMES = {
    "folder": f"Create Kubernetes objects folder {DIR}",
    **{manifest: (f"Install Kubernetes Secret {DIR}/{manifest}" if manifest == "secret.yaml"
                  else f"Install Kubernetes object {DIR}/{manifest}") for manifest in MANIFESTS},
    "apply": "Apply the Kubernetes objects, wait for deployment/kimi-k26 to roll out",
}
APPLY = ("kubectl apply --server-side --force-conflicts --field-manager=kimi-gb200 -n default "
         + " ".join(f"-f {DIR}/{manifest}" for manifest in MANIFESTS))
KIMI_ROLLOUT_S = rollout_deadline_s(595 * 10**9, 1.0e9)  # Kimi-K2.6 at the GB200 rate


@pytest.fixture(autouse=True)
def secrets(tmp_path, monkeypatch) -> str:
    """The API key in a controller file, the Hub token in the controller's environment (what
    tasks/weights.py reads when weights_hf_token_file is None)."""
    key_file = tmp_path / "vllm-api-key"
    key_file.write_text(API_KEY + "\n")
    monkeypatch.setenv("HF_TOKEN", HF_TOKEN)
    return str(key_file)


def node_data(secrets: str, **overrides) -> dict:
    return {**group_data("gb200"), "vllm_runtime": "kubernetes", "vllm_api_key_file": secrets,
            **overrides}


def stat_line(path: str, mode: str, size: int = 4096) -> str:
    """What `stat -c` prints for a path, in the format pyinfra's File fact asks for."""
    return (f"user=root group=root mode={mode} atime=1700000000 mtime=1700000000 "
            f"ctime=1700000000 size={size} '{path}'")


# The read-only `kubectl diff` the task runs against the files it keeps (the fact's command).
DIFF = KubernetesObjectsDiffer().command(
    kubectl=["kubectl"], namespace="default", field_manager="kimi-gb200",
    files=[f"{DIR}/{manifest}" for manifest in MANIFESTS]).get_raw_value()


def control_answers(files: dict[str, str], cluster: str = "0") -> dict:
    """fake_responses for a control host whose manifest folder holds ``files`` (name -> text),
    as this task leaves them: root-owned, secret.yaml 0600, the others 0644, and a cluster
    whose `kubectl diff` against them exits ``cluster`` (0: the same). Each file's answers
    come before the folder's, whose stat command is a prefix of theirs."""
    answers: dict = {DIFF: [cluster]}
    for manifest, text in files.items():
        path = f"{DIR}/{manifest}"
        mode = "-rw-------" if manifest == "secret.yaml" else "-rw-r--r--"
        answers[fact_command(File, path=path)] = stat_line(path, mode, len(text.encode()))
        answers[fact_command(Sha1File, path=path)] = \
            f"{hashlib.sha1(text.encode()).hexdigest()}  {path}"
        answers[fact_command(Sha256File, path=path)] = \
            f"{hashlib.sha256(text.encode()).hexdigest()}  {path}"
    if files:
        answers[fact_command(Directory, path=DIR)] = stat_line(DIR, "drwxr-xr-x")
    return answers


def prepared(secrets: str, answers: dict, nodes: tuple[dict, dict] = ({}, {}),
             control: dict | None = None, node_group: tuple[str, ...] = NODES):
    """A State with vllm_kubernetes.apply added for the control host only: two fake GB200
    nodes (group gb200) and one fake control host (group k8s_control)."""
    names = [(name, {**node_data(secrets, **overrides), **FAKE})
             for name, overrides in zip(NODES, nodes)]
    names.append((CONTROL, {**group_data(), **(control or {}), **FAKE,
                            "fake_responses": answers}))
    inventory = Inventory((names, {}), gb200=(list(node_group), {}),
                          k8s_control=([CONTROL], {}))
    state = State(inventory, Config())
    connect_all(state)
    host = inventory.get_host(CONTROL)
    add_deploy(state, vllm_kubernetes.apply, host=host)
    return state, host


def describe(command) -> str:
    if isinstance(command, FileUploadCommand):
        return f"upload {command.dest}"
    assert isinstance(command, StringCommand)
    return command.get_raw_value()


def plan(state, host) -> dict[str, list[str]]:
    """{operation name: commands} for every operation that would change something."""
    return planned_commands(state, host, describe)


def uploads(state, host) -> dict[str, str]:
    """Destination -> the text each upload would write (the secret lands in a .partial file
    created 0600 first, then renamed)."""
    found = {}
    with ctx_state.use(state), ctx_host.use(host):
        for op_hash in state.get_op_order():
            for command in state.get_op_data_for_host(host, op_hash).command_generator():
                if isinstance(command, FileUploadCommand):
                    command.src.seek(0)
                    text = command.src.read()
                    found[command.dest.removesuffix(".partial")] = (
                        text.decode() if isinstance(text, bytes) else text)
    return found


def rendered(secrets: str, nodes: tuple[dict, dict] = ({}, {})) -> dict[str, str]:
    """Manifest file name -> the text a fresh control host is sent for these node data."""
    state, host = prepared(secrets, {}, nodes)
    return {dest.removeprefix(f"{DIR}/"): text for dest, text in uploads(state, host).items()}


def deployment_args(text: str) -> list[str]:
    (container,) = yaml.safe_load(text)["spec"]["template"]["spec"]["containers"]
    return container["args"]


def pod_spec(text: str) -> dict:
    return yaml.safe_load(text)["spec"]["template"]["spec"]


def pinned_nodes(text: str) -> list[str]:
    """The kubernetes.io/hostname values the Deployment's required node affinity allows."""
    terms = pod_spec(text)["affinity"]["nodeAffinity"][
        "requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    (expression,) = [expression for term in terms for expression in term["matchExpressions"]]
    assert (expression["key"], expression["operator"]) == ("kubernetes.io/hostname", "In")
    return expression["values"]


# (a) A fresh control host: four files, then apply and rollout bounded by the probe window.

def test_fresh_control_host_uploads_four_files_then_applies_and_waits(secrets):
    state, host = prepared(secrets, {})
    planned = plan(state, host)
    assert list(planned) == list(NAMES.values())
    assert planned[NAMES["folder"]] == [f"mkdir -p {DIR}", f"chmod 755 {DIR}",
                                        f"chown root:root {DIR}"]
    secret = f"{DIR}/secret.yaml"
    # Created empty with mode 0600 before a byte of it is written.
    assert planned[NAMES["secret.yaml"]] == [
        f"mkdir -p {DIR} && install -m 0600 -o root -g root /dev/null {secret}.partial",
        f"upload {secret}.partial", f"mv -f {secret}.partial {secret}"]
    for manifest in ("resourceclaimtemplate.yaml", "deployment.yaml", "service.yaml"):
        path = f"{DIR}/{manifest}"
        assert planned[NAMES[manifest]] == [f"upload {path}", f"chown root:root {path}",
                                            f"chmod 644 {path}"]
    apply, rollout = planned[NAMES["apply"]]
    assert apply == APPLY
    assert rollout.startswith("sh -c 'kubectl -n default rollout status deployment/kimi-k26 "
                              f"--timeout={KIMI_ROLLOUT_S}s || ")
    assert KIMI_ROLLOUT_S == 1790 + 900  # the startup window, then scheduling and the image pull
    assert state.get_meta_for_host(host).ops_change == 6


def test_rollout_waits_as_long_as_the_startup_probe_allows(secrets):
    """The same derived window: the checkpoint at the nodes' load rate, as the Deployment's
    startupProbe is sized, plus the time to schedule and pull that the Deployment's own
    progress deadline allows."""
    slow = {"vllm_load_bytes_per_s": 2.5e8}
    state, host = prepared(secrets, {}, (slow, slow))
    (_, rollout) = plan(state, host)[NAMES["apply"]]
    window = rollout_deadline_s(595 * 10**9, 2.5e8)
    assert f"--timeout={window}s" in rollout and window != KIMI_ROLLOUT_S
    deployment = yaml.safe_load(uploads(state, host)[f"{DIR}/deployment.yaml"])
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    probe = container["startupProbe"]
    assert probe["periodSeconds"] * probe["failureThreshold"] == startup_probe_window_s(
        595 * 10**9, 2.5e8)
    assert deployment["spec"]["progressDeadlineSeconds"] == window


def test_kubeconfig_and_kubectl_command_come_from_the_data(secrets):
    control = {"k8s_kubectl": "k3s kubectl", "k8s_kubeconfig": "/etc/rancher/k3s/k3s.yaml",
               "k8s_namespace": "inference", "k8s_field_manager": "ops-pyinfra"}
    state, host = prepared(secrets, {}, control=control)
    apply, rollout = plan(state, host)[NAMES["apply"]]
    assert apply.startswith("k3s kubectl --kubeconfig=/etc/rancher/k3s/k3s.yaml apply "
                            "--server-side --force-conflicts --field-manager=ops-pyinfra "
                            "-n inference -f ")
    assert "k3s kubectl --kubeconfig=/etc/rancher/k3s/k3s.yaml -n inference rollout status " \
           "deployment/kimi-k26" in rollout
    assert yaml.safe_load(uploads(state, host)[f"{DIR}/service.yaml"])["metadata"][
        "namespace"] == "inference"


# (b) Nothing changed: no command at all, kubectl included.

def test_converged_control_host_plans_nothing(secrets):
    state, host = prepared(secrets, control_answers(rendered(secrets)))
    assert plan(state, host) == {}
    assert state.get_meta_for_host(host).ops_change == 0


def test_converged_control_host_runs_nothing_through_the_connector(secrets):
    state, host = prepared(secrets, control_answers(rendered(secrets)))
    run_ops(state)
    assert state.failed_hosts == set()
    # Only facts ran: the read-only diff, never an apply, a rollout or an upload.
    executed = host.connector.executed_commands
    assert any("kubectl diff --server-side" in command for command in executed)
    assert not any(word in command for command in executed
                   for word in ("kubectl apply", "rollout", "upload"))


def test_a_cluster_edited_by_hand_is_applied_again_from_unchanged_files(secrets):
    """Someone scaled or edited the Deployment: `kubectl diff` exits 1, the files stay, the
    objects are applied again and the rollout waited for (the drift check sees the change)."""
    state, host = prepared(secrets, control_answers(rendered(secrets), cluster="1"))
    planned = plan(state, host)
    assert list(planned) == [NAMES["apply"]]
    assert planned[NAMES["apply"]][0] == APPLY
    assert "rollout status deployment/kimi-k26" in planned[NAMES["apply"]][1]


def test_a_diff_that_cannot_run_applies_nothing_and_says_so(secrets, caplog):
    state, host = prepared(secrets, control_answers(rendered(secrets), cluster="2"))
    assert plan(state, host) == {}
    assert "kubectl diff could not compare the cluster" in caplog.text


# (c) One changed input: only its file, then apply and rollout.

def test_changed_node_data_uploads_only_the_deployment_then_applies(secrets):
    longer = {"vllm_extra_args": ["--max-model-len", "65536"]}
    state, host = prepared(secrets, control_answers(rendered(secrets)), (longer, longer))
    planned = plan(state, host)
    deployment = f"{DIR}/deployment.yaml"
    assert planned == {
        NAMES["deployment.yaml"]: [f"upload {deployment}", f"chown root:root {deployment}",
                                   f"chmod 644 {deployment}"],
        NAMES["apply"]: [APPLY, planned[NAMES["apply"]][1]],
    }
    assert f"rollout status deployment/kimi-k26 --timeout={KIMI_ROLLOUT_S}s" in \
        planned[NAMES["apply"]][1]
    assert deployment_args(uploads(state, host)[deployment])[-2:] == ["--max-model-len", "65536"]


def test_rotated_api_key_uploads_only_the_secret_and_restarts_the_pod(secrets, tmp_path):
    """A pod reads its Secret at start only: a new key alone restarts the Deployment."""
    converged = control_answers(rendered(secrets))
    rotated = tmp_path / "rotated-key"
    rotated.write_text("sk-test-rotated-00000001\n")
    new_key = {"vllm_api_key_file": str(rotated)}
    state, host = prepared(secrets, converged, (new_key, new_key))
    planned = plan(state, host)
    assert list(planned) == [NAMES["secret.yaml"], NAMES["apply"]]
    apply, restart, rollout = planned[NAMES["apply"]]
    assert apply == APPLY
    assert restart == "kubectl -n default rollout restart deployment/kimi-k26"
    assert "rollout status deployment/kimi-k26" in rollout


@pytest.fixture
def node_tls(tmp_path) -> dict:
    """vllm_tls_* data for both nodes: a CA, then two certificates (the second for a rotation)
    naming both nodes, as one Deployment serving them needs; keys outside the repository."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_file = tmp_path / "ca.pem"
    ca_file.write_bytes(pem(certificate(ca_key, ca_key, "test CA", "test CA", 30, ca=True)))
    names = [x509.DNSName(address_of(node, {})) for node in NODES]
    made = {}
    for turn in ("first", "second"):
        key = ec.generate_private_key(ec.SECP256R1())
        (tmp_path / f"{turn}.pem").write_bytes(
            pem(certificate(key, ca_key, "tray", "test CA", 30, names)))
        (tmp_path / f"{turn}.key").write_bytes(pem(key))
        made[turn] = {"vllm_tls_cert_file": str(tmp_path / f"{turn}.pem"),
                      "vllm_tls_key_file": str(tmp_path / f"{turn}.key"),
                      "vllm_tls_ca_file": str(ca_file)}
        made[f"{turn}_key_line"] = pem(key).decode().splitlines()[1]
    return made


def test_tls_puts_the_files_in_the_secret_and_serves_https(secrets, node_tls):
    first = node_tls["first"]
    texts = rendered(secrets, (first, first))
    secret = yaml.safe_load(texts["secret.yaml"])["data"]
    assert sorted(secret) == ["VLLM_API_KEY", "ca.crt", "server.crt", "server.key"]
    assert node_tls["first_key_line"] in base64.b64decode(secret["server.key"]).decode()
    args = deployment_args(texts["deployment.yaml"])
    assert args[args.index("--ssl-keyfile") + 1] == "/etc/vllm/tls/server.key"
    for name, text in texts.items():
        assert node_tls["first_key_line"] not in text, name


def test_a_new_certificate_uploads_only_the_secret_and_restarts_the_pod(secrets, node_tls):
    """vLLM reads its certificate at start, as it does its key: a rotation restarts it once."""
    first, second = node_tls["first"], node_tls["second"]
    state, host = prepared(secrets, control_answers(rendered(secrets, (first, first))),
                           (second, second))
    planned = plan(state, host)
    assert list(planned) == [NAMES["secret.yaml"], NAMES["apply"]]
    assert planned[NAMES["apply"]][1] == "kubectl -n default rollout restart deployment/kimi-k26"
    for commands in planned.values():
        assert not any(node_tls[line] in " ".join(commands)
                       for line in ("first_key_line", "second_key_line"))


def test_nodes_with_other_certificates_are_named_but_not_shown(secrets, node_tls):
    with pytest.raises(DataError) as raised:
        prepared(secrets, {}, (node_tls["first"], node_tls["second"]))
    message = str(raised.value)
    assert ("vllm_tls_cert_file, vllm_tls_key_file, vllm_tls_ca_file: found tls: the values "
            "differ (secret: not shown)") in message
    assert node_tls["first_key_line"] not in message
    assert node_tls["second_key_line"] not in message


def test_a_certificate_that_does_not_name_a_node_is_refused(secrets, node_tls, tmp_path):
    first = dict(node_tls["first"])
    with pytest.raises(DataError) as raised:
        prepared(secrets, {}, ({**first, "ssh_hostname": "10.9.8.7"}, first))
    assert f"{NODES[0]}: vllm_tls_cert_file" in str(raised.value)
    assert "a certificate naming 10.9.8.7" in str(raised.value)


# (d) The container runs the one renderer's command, with the pod's paths.

@pytest.mark.parametrize("speculative", [False, True], ids=["no-draft", "draft"])
def test_deployment_args_are_the_venv_command_with_the_pods_paths(secrets, speculative):
    data = node_data(secrets, model_speculative=speculative)
    settings = read_settings(FakeHost(NODES[0], data))
    on = {"model_speculative": speculative}
    args = deployment_args(rendered(secrets, (on, on))["deployment.yaml"])
    assert args == settings.serve_args_at(model_path=MODEL_MOUNT,
                                          draft_path=DRAFT_MOUNT if speculative else None)
    # Flag for flag what the venv and docker runtimes run, the weights' paths aside.
    on_host = [MODEL_MOUNT if arg == settings.model_dir else arg for arg in settings.serve_args]
    if speculative:
        index = on_host.index("--speculative-config") + 1
        assert json.loads(on_host[index])["model"] == settings.draft_dir
        on_host[index] = on_host[index].replace(f'"{settings.draft_dir}"', f'"{DRAFT_MOUNT}"')
    assert args == on_host
    assert ("--speculative-config" in args) is speculative


def test_host_path_volumes_are_the_nodes_weights_folders(secrets):
    on = {"model_speculative": True}
    pod = yaml.safe_load(rendered(secrets, (on, on))["deployment.yaml"])["spec"]["template"][
        "spec"]
    assert [volume.get("hostPath", {}).get("path") for volume in pod["volumes"]] == [
        "/raid/models/kimi-k2.6", "/raid/models/kimi-k2.6-eagle3", None]


def test_claims_mount_the_models_folders_of_one_claim(secrets):
    control = {"k8s_volume_type": "persistentVolumeClaim", "k8s_model_claim": "kimi-models"}
    on = {"model_speculative": True}
    state, host = prepared(secrets, {}, (on, on), control=control)
    pod = yaml.safe_load(uploads(state, host)[f"{DIR}/deployment.yaml"])["spec"]["template"][
        "spec"]
    assert [volume.get("persistentVolumeClaim") for volume in pod["volumes"][:2]] == [
        {"claimName": "kimi-models", "readOnly": True}] * 2
    (container,) = pod["containers"]
    assert [mount.get("subPath") for mount in container["volumeMounts"][:2]] == [
        "kimi-k2.6", "kimi-k2.6-eagle3"]


def test_image_digest_is_split_off_the_pinned_reference(secrets):
    digest = "sha256:" + "0123456789abcdef" * 4
    pinned = {"vllm_image": {"aarch64": f"vllm/vllm-openai:v0.19.1-cu130@{digest}"}}
    deployment = yaml.safe_load(rendered(secrets, (pinned, pinned))["deployment.yaml"])
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["image"] == f"vllm/vllm-openai:v0.19.1-cu130@{digest}"
    assert deployment["spec"]["template"]["spec"]["nodeSelector"]["kubernetes.io/arch"] == \
        "arm64"


# (e) Nodes that disagree stop the run, naming both.

def test_nodes_that_disagree_are_named_with_what_differs(secrets):
    with pytest.raises(DataError) as raised:
        prepared(secrets, {}, ({}, {"vllm_extra_args": ["--max-model-len", "65536"]}))
    (problem,) = raised.value.problems
    assert problem.host == NODES[1] and problem.key.startswith("model_*, vllm_host")
    assert str(problem).startswith(f"{NODES[1]}: model_*, vllm_host")
    assert "found serve_args: [] only on the first, ['--max-model-len', '65536'] only on the " \
        "second; need the same as on " + NODES[0] in str(problem)


def test_a_differing_secret_is_named_but_not_shown(secrets, tmp_path):
    other = tmp_path / "other-key"
    other.write_text("sk-test-other-node-77\n")
    with pytest.raises(DataError) as raised:
        prepared(secrets, {}, ({}, {"vllm_api_key_file": str(other)}))
    message = str(raised.value)
    assert ("vllm_api_key_file, vllm_api_key_command: found api_key: the values differ "
            "(secret: not shown)") in message
    assert API_KEY not in message and "sk-test-other-node-77" not in message


def test_a_control_host_beside_nodes_that_serve_themselves_plans_nothing(secrets):
    state, host = prepared(secrets, {}, ({"vllm_runtime": "docker"}, {"vllm_runtime": "docker"}))
    assert plan(state, host) == {}
    assert state.get_op_order() == []


def test_a_node_of_another_runtime_is_refused(secrets):
    with pytest.raises(DataError, match=rf"{NODES[1]}: vllm_runtime: found 'docker'; need "
                                        "kubernetes"):
        prepared(secrets, {}, ({}, {"vllm_runtime": "docker"}))


# (f) Bad data stops the deploy before its first operation, naming host and key.

@pytest.mark.parametrize("key, value", [
    ("k8s_node_group", 5),
    ("k8s_namespace", "Inference"),
    ("k8s_name", "k" * 54),
    ("k8s_volume_type", "nfs"),
    ("k8s_model_claim", "kimi-models"),  # a claim with hostPath volumes
    ("k8s_service_type", "LoadBalancer"),
    ("k8s_node_port", 8000),
    ("k8s_node_port", True),
    ("k8s_node_port", 40000),
    ("k8s_manifest_dir", "etc/vllm-kubernetes"),
    ("k8s_manifest_dir", "/etc"),
    ("k8s_manifest_dir", "/etc/vllm kubernetes"),
    ("k8s_kubectl", " "),
    ("k8s_kubeconfig", "k3s.yaml"),
    ("k8s_field_manager", "ops team"),
])
def test_bad_data_raises_data_error_naming_host_and_key(secrets, key, value):
    with pytest.raises(DataError) as raised:
        prepared(secrets, {}, control={key: value})
    (problem,) = raised.value.problems
    assert str(problem).startswith(f"{CONTROL}: {key}: found {value!r}; need "), problem


def test_a_node_port_out_of_range_is_refused_with_cluster_ip_too(secrets):
    with pytest.raises(DataError) as raised:
        prepared(secrets, {}, control={"k8s_service_type": "ClusterIP", "k8s_node_port": -1})
    (problem,) = raised.value.problems
    assert str(problem) == (f"{CONTROL}: k8s_node_port: found -1; need a port in the NodePort "
                            "range 30000-32767")


def test_bad_data_adds_no_operation(secrets):
    inventory = Inventory(([(CONTROL, {**group_data(), "k8s_namespace": "Inference", **FAKE})],
                           {}), k8s_control=([CONTROL], {}))
    state = State(inventory, Config())
    connect_all(state)
    with pytest.raises(DataError):
        add_deploy(state, vllm_kubernetes.apply)
    assert state.get_op_order() == []


def test_every_problem_is_reported_at_once():
    with pytest.raises(DataError) as raised:
        read_kubernetes_settings("bastion", {**group_data(), "k8s_volume_type":
                                             "persistentVolumeClaim", "k8s_node_port": 80,
                                             "k8s_kubeconfig": "relative"})
    assert sorted((p.host, p.key) for p in raised.value.problems) == [
        ("bastion", "k8s_kubeconfig"), ("bastion", "k8s_model_claim"),
        ("bastion", "k8s_node_port")]


def test_an_empty_node_group_names_the_key(secrets):
    with pytest.raises(DataError, match=rf"{CONTROL}: k8s_node_group: found 'gb200'; need an "
                                        "inventory group holding the GPU nodes"):
        prepared(secrets, {}, node_group=())


def test_values_the_objects_cannot_hold_name_the_control_host(secrets):
    clash = {"vllm_environment": {"HF_TOKEN": "plain"}}
    with pytest.raises(DataError) as raised:
        prepared(secrets, {}, (clash, clash))
    (problem,) = raised.value.problems
    assert str(problem).startswith(f"{CONTROL}: the Kubernetes objects from {NODES[0]}'s "
                                   "data: found environment holds ['HF_TOKEN']"), problem


# (g) Secrets reach the control host only inside the 0600 file; the Hub token not at all.

def test_no_secret_value_in_any_planned_command(secrets):
    state, host = prepared(secrets, {})
    commands = [command for commands in plan(state, host).values() for command in commands]
    assert any("kubectl" in command for command in commands)
    assert not any(API_KEY in command for command in commands)
    secret = yaml.safe_load(uploads(state, host)[f"{DIR}/secret.yaml"])
    assert {key: base64.b64decode(value).decode() for key, value in secret["data"].items()} \
        == {"VLLM_API_KEY": API_KEY}
    encoded = base64.b64encode(API_KEY.encode()).decode()
    others = [text for dest, text in uploads(state, host).items() if "secret" not in dest]
    assert len(others) == 3 and not any(value in text for text in others
                                        for value in (API_KEY, encoded))


@pytest.mark.parametrize("token_in", ["environment", "file"])
def test_the_operators_hub_token_never_reaches_the_cluster(secrets, tmp_path, token_in):
    """The nodes fetch the weights with the token (tasks/weights.py); the pod only reads them,
    offline. Neither the control host's files nor its commands carry it, wherever the
    operator keeps it (HF_TOKEN on the controller, the fixture's, or weights_hf_token_file)."""
    nodes = ({}, {})
    if token_in == "file":
        token_file = tmp_path / "hub-token"
        token_file.write_text(HF_TOKEN + "\n")
        nodes = ({"weights_hf_token_file": str(token_file)},) * 2
    state, host = prepared(secrets, {}, nodes)
    texts = uploads(state, host)
    encoded = base64.b64encode(HF_TOKEN.encode()).decode()
    assert len(texts) == len(MANIFESTS)
    for dest, text in texts.items():
        assert HF_TOKEN not in text and encoded not in text and "HF_TOKEN" not in text, dest
    commands = [command for commands in plan(state, host).values() for command in commands]
    assert commands and not any(HF_TOKEN in command for command in commands)


# (h) The pod: pinned to the nodes of the group, offline.

def test_the_pod_is_pinned_to_the_nodes_of_the_group(secrets):
    """Each node's k8s_node_name, else its inventory name without the connector's prefix: the
    nodes this deploy filled with the weights, and no other."""
    named = {"k8s_node_name": "gb200-a01.cluster.example"}
    state, host = prepared(secrets, {}, (named, {}))
    deployment = uploads(state, host)[f"{DIR}/deployment.yaml"]
    assert pinned_nodes(deployment) == ["gb200-a01.cluster.example", "tray-02"]
    assert pod_spec(deployment)["nodeSelector"] == {"kubernetes.io/arch": "arm64"}


def test_a_node_outside_the_group_is_not_allowed(secrets):
    """The group shrinks to one tray: the pod may no longer land on the other."""
    state, host = prepared(secrets, {}, node_group=NODES[:1])
    assert pinned_nodes(uploads(state, host)[f"{DIR}/deployment.yaml"]) == ["tray-01"]


NEED_NODE_NAME = ("None or the node's kubernetes.io/hostname label, an RFC 1123 subdomain of "
                  "at most 63 characters")


@pytest.mark.parametrize("name, given, need", [
    ("@fake/tray-01", "Tray_01", NEED_NODE_NAME),
    ("@fake/tray-01", "t" * 64, NEED_NODE_NAME),
    ("@fake/tray-01", "tray-01..example", NEED_NODE_NAME),
    ("@fake/tray-01", 5, NEED_NODE_NAME),
    # No k8s_node_name and an inventory name that is no node's.
    ("@local", None, NEED_NODE_NAME + " (its inventory name, '@local', is none)"),
    ("GB200-Tray-01", None, NEED_NODE_NAME + " (its inventory name, 'GB200-Tray-01', is none)"),
])
def test_a_node_name_no_node_can_carry_names_the_host_and_key(name, given, need):
    """FakeHost stands in for the inventory's host: node_names reads only names and data."""
    with pytest.raises(DataError) as raised:
        node_names([FakeHost(name, {"k8s_node_name": given})])
    (problem,) = raised.value.problems
    assert str(problem) == f"{name}: k8s_node_name: found {given!r}; need {need}"


def test_node_names_default_to_the_inventory_names():
    hosts = [FakeHost("@fake/gb200-tray-01", {}), FakeHost("gb200-tray-02", {}),
             FakeHost("@ssh/10.0.0.3", {"k8s_node_name": None})]
    assert node_names(hosts) == ("gb200-tray-01", "gb200-tray-02", "10.0.0.3")


def test_two_hosts_on_one_node_are_refused(secrets):
    with pytest.raises(DataError) as raised:
        prepared(secrets, {}, ({}, {"k8s_node_name": "tray-01"}))
    (problem,) = raised.value.problems
    assert str(problem) == (f"{NODES[1]}: k8s_node_name: found 'tray-01'; need a node of its "
                            f"own ({NODES[0]} is node 'tray-01' too)")


def test_the_pod_runs_offline_with_the_nodes_environment_on_top(secrets):
    extra = {"vllm_environment": {"VLLM_LOGGING_LEVEL": "DEBUG", "DO_NOT_TRACK": "0"}}
    deployment = rendered(secrets, (extra, extra))["deployment.yaml"]
    (container,) = pod_spec(deployment)["containers"]
    plain = {item["name"]: item["value"] for item in container["env"] if "value" in item}
    # The data's value wins, as in vllm.service (tasks/vllm_service.py).
    assert plain == {**OFFLINE_ENVIRONMENT, "VLLM_LOGGING_LEVEL": "DEBUG", "DO_NOT_TRACK": "0"}


@pytest.mark.parametrize("rate", [0.5, float("inf"), float("nan")],
                         ids=["GB-per-s-slip", "infinite", "nan"])
def test_a_load_rate_the_rollout_cannot_use_stops_the_run_naming_node_and_key(secrets, rate):
    """0.5 is a rate given in GB/s: the rollout deadline it gives (some 75,000 years) overflows
    progressDeadlineSeconds, an int32. tasks/settings.py refuses such a rate on the node, and
    ManifestValues refuses it again for any other caller (tests/unit/test_k8s_manifests.py)."""
    slip = {"vllm_load_bytes_per_s": rate}
    with pytest.raises(DataError) as raised:
        prepared(secrets, {}, (slip, slip))
    problem = str(raised.value).splitlines()[1]
    assert NODES[0] in problem and "vllm_load_bytes_per_s" in problem, problem
    assert repr(rate) in problem, problem


# The rollout's failure path, run against a stub kubectl.

KUBECTL_STUB = """#!/bin/sh
# Answers like kubectl for a Deployment whose pod never becomes ready.
case "$*" in
*"rollout status"*) echo 'error: timed out waiting for the condition' >&2; exit 1 ;;
*" get "*) echo 'pod/kimi-k26-7d9f 0/1 Running 2 30m' ;;
*" describe "*) echo 'Warning  Unhealthy  Startup probe failed: connection refused' ;;
*" logs "*) echo 'ERROR vLLM engine failed to start: CUDA out of memory' ;;
esac
"""


def test_a_failed_rollout_prints_what_kubernetes_and_vllm_say(tmp_path):
    stub = tmp_path / "kubectl"
    stub.write_text(KUBECTL_STUB)
    stub.chmod(0o755)
    config = read_kubernetes_settings("bastion", group_data())
    result = subprocess.run(["sh", "-c", rollout_script(config, 1790)], capture_output=True,
                            text=True, env={"PATH": f"{tmp_path}:/usr/bin:/bin"})
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert lines[0] == "error: timed out waiting for the condition"
    assert lines[1] == ("deployment/kimi-k26 in namespace default did not roll out within "
                        "1790s (its progress deadline); what Kubernetes says:")
    assert lines[2:] == ["pod/kimi-k26-7d9f 0/1 Running 2 30m",
                         "Warning  Unhealthy  Startup probe failed: connection refused",
                         "last lines of vLLM:",
                         "ERROR vLLM engine failed to start: CUDA out of memory"]


def test_a_successful_rollout_prints_nothing_more(tmp_path):
    stub = tmp_path / "kubectl"
    stub.write_text("#!/bin/sh\necho 'deployment \"kimi-k26\" successfully rolled out'\n")
    stub.chmod(0o755)
    config = read_kubernetes_settings("bastion", group_data())
    result = subprocess.run(["sh", "-c", rollout_script(config, 60)], capture_output=True,
                            text=True, env={"PATH": f"{tmp_path}:/usr/bin:/bin"})
    assert (result.returncode, result.stderr) == (0, "")
