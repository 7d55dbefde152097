"""tasks/k8s_manifests.py: the seed's Kubernetes objects rendered from the project's state,
validated offline against the Kubernetes 1.34 and 1.35 schemas and lined up against the seed."""

import base64
import dataclasses
import datetime
import shlex

import kubernetes_validate
import pytest
import yaml

from tasks.k8s_manifests import (DRAFT_MOUNT, MANIFESTS, MODEL_MOUNT, TEMPLATE_DIR,
                                 ManifestValues, ManifestValuesError, render_manifests, startup_probe_window_s,
                                 template_context)
from tasks.models import PROFILES, vllm_serve_args
from tasks.settings import OFFLINE_ENVIRONMENT, STOP_MARGIN_S
from tasks.tls import Tls, serve_flags
from tests.helpers import REPO, SEED, group_data

SEED_MANIFEST = REPO / "tests" / "fixtures" / "seed-k8s.yaml"
SEED_LINES = (164, 257)  # the manifest's first and last line in the seed, 1-based
K8S_VERSIONS = ("1.34.0", "1.35.0")
# Recognisable stand-ins, so a leak into any text can be searched for.
API_KEY = "sk-test-4f1c9e0b7d2a6e13"
# Stand-in PEM texts: rendering copies them, it does not parse them (tasks/tls.py did).
TLS = Tls(cert="-----BEGIN CERTIFICATE-----\ntest-cert-3b9d\n-----END CERTIFICATE-----\n",
          key="-----BEGIN PRIVATE KEY-----\ntest-tls-key-5e21c7\n-----END PRIVATE KEY-----\n",
          ca="-----BEGIN CERTIFICATE-----\ntest-ca-77f0\n-----END CERTIFICATE-----\n",
          names=("gb200-tray-01", "gb200-tray-02"),
          not_after=datetime.datetime(2027, 12, 1, tzinfo=datetime.timezone.utc))
DIGEST = "sha256:" + "0123456789abcdef" * 4
# The GB200 inventory's trays, as their kubernetes.io/hostname labels.
TRAYS = ("gb200-tray-01", "gb200-tray-02")


def gb200_serve_args(draft: bool, tls: bool = False, **overrides) -> list[str]:
    """The container argv the GB200 group's data gives, as tasks/vllm_kubernetes.py builds it
    (with vLLM's TLS flags when `tls`)."""
    data = {**group_data("gb200"), **overrides}
    return vllm_serve_args(
        PROFILES[data["model_profile"]], model_path=MODEL_MOUNT,
        draft_path=DRAFT_MOUNT if draft else None, host=data["vllm_host"],
        port=data["vllm_port"], tensor_parallel_size=data["vllm_tensor_parallel_size"],
        gpu_memory_utilization=data["vllm_gpu_memory_utilization"],
        num_speculative_tokens=data["model_num_speculative_tokens"],
        shutdown_timeout_s=data["vllm_shutdown_timeout_s"], extra_args=data["vllm_extra_args"],
        tls_flags=serve_flags("kubernetes") if tls else ())


def make_values(*, draft: bool = True, volume_type: str = "hostPath",
                service_type: str = "NodePort", tls: bool = False,
                **overrides) -> ManifestValues:
    data = group_data("gb200")
    profile = PROFILES[data["model_profile"]]
    if volume_type == "hostPath":
        weights = {"model_volume": f"{data['weights_dir']}/{profile.local_name}",
                   "draft_volume": (f"{data['weights_dir']}/{profile.draft_local_name}"
                                    if draft else None)}
    else:
        # One claim holding a folder per model, as weights_dir does on a host.
        weights = {"model_volume": "kimi-models", "model_sub_path": profile.local_name,
                   "draft_volume": "kimi-models" if draft else None,
                   "draft_sub_path": profile.draft_local_name if draft else None}
    values = {"serve_args": gb200_serve_args(draft, tls),
              "checkpoint_size_bytes": profile.size_bytes,
              "load_bytes_per_s": data["vllm_load_bytes_per_s"], "volume_type": volume_type,
              "service_type": service_type, "api_key": API_KEY, "node_names": TRAYS,
              "tls": TLS if tls else None, **weights}
    return ManifestValues(**{**values, **overrides})


def load(text: str) -> dict:
    documents = [doc for doc in yaml.safe_load_all(text) if doc is not None]
    assert len(documents) == 1, "one object per file"
    return documents[0]


def objects(values: ManifestValues) -> dict[str, dict]:
    return {name: load(text) for name, text in render_manifests(values).items()}


def container(deployment: dict) -> dict:
    (only,) = deployment["spec"]["template"]["spec"]["containers"]
    return only


# (a) Offline schema validation, strict: an unknown or misplaced field fails.

VARIANTS = [
    pytest.param(draft, volume_type, service_type,
                 id=f"{volume_type}-{'draft' if draft else 'nodraft'}-{service_type}")
    for volume_type in ("hostPath", "persistentVolumeClaim")
    for draft in (True, False)
    for service_type in ("NodePort", "ClusterIP")
]


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("tls", [False, True], ids=["http", "tls"])
@pytest.mark.parametrize("draft, volume_type, service_type", VARIANTS)
def test_every_object_validates_strictly(version, draft, volume_type, service_type, tls):
    rendered = objects(make_values(draft=draft, volume_type=volume_type,
                                   service_type=service_type, tls=tls))
    assert list(rendered) == list(MANIFESTS)
    for name, obj in rendered.items():
        # validate() answers with the schema version it used: proof that the wanted one exists.
        assert kubernetes_validate.validate(obj, version, strict=True) == version[:4], name


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("api_key", [None, API_KEY])
def test_secret_validates_with_or_without_the_key(version, api_key):
    secret = objects(make_values(api_key=api_key))["secret.yaml"]
    assert kubernetes_validate.validate(secret, version, strict=True) == version[:4]


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_unpinned_claim_volumes_validate_without_affinity(version):
    deployment = objects(make_values(volume_type="persistentVolumeClaim",
                                     node_names=()))["deployment.yaml"]
    assert "affinity" not in deployment["spec"]["template"]["spec"]
    assert kubernetes_validate.validate(deployment, version, strict=True) == version[:4]


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_seed_objects_validate_too(version):
    """The comparison below is against objects the same schemas accept."""
    for obj in yaml.safe_load_all(SEED_MANIFEST.read_text()):
        assert kubernetes_validate.validate(obj, version, strict=True) == version[:4]


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("break_it", [
    lambda o: o["deployment.yaml"]["spec"]["template"]["spec"].update(nodeSelectr={}),
    lambda o: container(o["deployment.yaml"])["startupProbe"].update(failureThreshold="179"),
    lambda o: o["resourceclaimtemplate.yaml"]["spec"]["spec"]["devices"]["requests"][0]
    .update(count=4),  # v1 moved count under `exactly`: the old place must fail
], ids=["unknown-field", "wrong-type", "v1beta1-layout"])
def test_strict_validation_catches_mistakes(version, break_it):
    rendered = objects(make_values())
    break_it(rendered)
    with pytest.raises(kubernetes_validate.ValidationError):
        for obj in rendered.values():
            kubernetes_validate.validate(obj, version, strict=True)


# (b) Field by field against the seed (section 4.1); every difference is listed with its reason.

CONTAINER = ("spec", "template", "spec", "containers", "[vllm-server]")
POD = ("spec", "template", "spec")
MANAGED_BY = "app.kubernetes.io/managed-by"
INTENTIONAL_DIFFERENCES = {
    ("Secret",): "new object: the seed's endpoint had no API key; the key now lives in a "
                 "Secret that the Deployment references by name (the Hub token never: the "
                 "pod downloads nothing)",
    ("ResourceClaimTemplate", "metadata", "labels"):
        "labels on every object: `kubectl get all -l app=NAME` finds them all, managed-by "
        "names the owner",
    ("Service", "metadata", "labels"): "as above",
    ("Deployment", "metadata", "labels"): "as above",
    ("Deployment", "spec", "template", "metadata", "labels", MANAGED_BY):
        "as above; the selector keeps the seed's lone `app` label (selectors are immutable)",
    ("Deployment", "spec", "strategy"):
        "Recreate: the old pod holds the tray's GPUs, so a rolling update's extra pod would "
        "wait forever for GPUs that only its own rollout frees",
    ("Deployment", "spec", "progressDeadlineSeconds"):
        "the default 600 s would declare a rollout failed while 595 GB are still loading: "
        "the startup window plus time to schedule, claim GPUs and pull the image",
    ("Deployment", *POD, "enableServiceLinks"):
        "off: Kubernetes injects NAME_PORT-style variables for every Service, and vLLM reads "
        "VLLM_* variables (a Service named vllm would set VLLM_PORT and break start-up)",
    ("Deployment", *POD, "terminationGracePeriodSeconds"):
        "vLLM's --shutdown-timeout (vllm_shutdown_timeout_s) plus the exit margin the units "
        "allow: the default 30 s would SIGKILL a pod mid-drain, failing in-flight requests",
    ("Deployment", *POD, "nodeSelector"):
        "GB200 trays are arm64 (Grace): the pod must not land on an x86 node, whatever GPUs "
        "it has; an extra selector can pin a node pool",
    ("Deployment", *POD, "affinity"):
        "pinned to the trays of k8s_node_group by kubernetes.io/hostname: only they hold the "
        "hostPath weights; on any other arm64 GPU node the pod waits out its deadline",
    ("Deployment", *CONTAINER, "command"):
        "exec form, `vllm` with the argv from tasks.models.vllm_serve_args: no shell to quote "
        "the speculative-config JSON, and the same argv as every other runtime "
        "(test_exec_form_is_the_seeds_shell_command_word_for_word)",
    ("Deployment", *CONTAINER, "args"): "as command",
    ("Deployment", *CONTAINER, "env"):
        "offline and no telemetry, the systemd units' list (tasks.settings."
        "OFFLINE_ENVIRONMENT); VLLM_API_KEY by secretKeyRef (optional: a missing key leaves "
        "the endpoint open, as the seed's was), never a literal value; no Hub token",
    ("Deployment", *CONTAINER, "securityContext"):
        "no capability and no privilege gained through exec, as the docker runtime's "
        "`--cap-drop ALL --security-opt no-new-privileges`: the DRA driver hands the GPUs "
        "over, vLLM itself needs neither",
    ("Deployment", *CONTAINER, "startupProbe"):
        "the seed had no probes: the window is derived from checkpoint size and load rate, "
        "so a 595 GB load is not killed half-way",
    ("Deployment", *CONTAINER, "readinessProbe"):
        "the Service sends requests only once /health answers",
    ("Deployment", *CONTAINER, "livenessProbe"): "a hung server is restarted",
    ("Deployment", *CONTAINER, "volumeMounts", "[dshm]"):
        "/dev/shm is 64 MiB in a pod by default; tensor-parallel vLLM needs more for its "
        "shared-memory transfers between ranks",
    ("Deployment", *POD, "volumes", "[dshm]"): "as the /dev/shm mount",
    ("Deployment", *POD, "volumes", "[model-storage]", "hostPath", "path"):
        "weights_dir is /raid/models/NAME; the seed's /raid/lixd/models is one user's folder",
    ("Deployment", *POD, "volumes", "[eagle-model-storage]", "hostPath", "path"): "as above",
}


def flatten(node, path=()) -> dict[tuple, object]:
    """Leaf path -> value; list items with a name are keyed by it, so order does not matter."""
    if isinstance(node, dict):
        leaves = {}
        for key, value in node.items():
            leaves.update(flatten(value, (*path, key)))
        return leaves
    if isinstance(node, list) and node and all(isinstance(i, dict) and "name" in i
                                               for i in node):
        return {leaf: value for item in node
                for leaf, value in flatten(item, (*path, f"[{item['name']}]")).items()}
    if isinstance(node, list) and node:
        return {leaf: value for index, item in enumerate(node)
                for leaf, value in flatten(item, (*path, index)).items()}
    return {path: node}


def by_kind(documents) -> dict[tuple, object]:
    leaves = {}
    for doc in documents:
        leaves.update(flatten(doc, (doc["kind"],)))
    return leaves


def seed_documents() -> list[dict]:
    return list(yaml.safe_load_all(SEED_MANIFEST.read_text()))


def test_fixture_is_the_seeds_manifest_line_for_line():
    if not SEED.exists():
        pytest.skip(f"the seed is not beside this clone ({SEED}); the fixture stands for it")
    first, last = SEED_LINES
    seed = SEED.read_text().splitlines()[first - 1:last]
    assert seed[0].startswith("| "), "the seed's code-block frame moved: update SEED_LINES"
    seed[0] = seed[0][2:]
    fixture = [line for line in SEED_MANIFEST.read_text().splitlines()
               if not line.startswith("#")]
    assert [line.strip() for line in fixture] == [line.strip() for line in seed]
    assert [doc["kind"] for doc in seed_documents()] == \
        ["ResourceClaimTemplate", "Deployment", "Service"]


def test_rendered_objects_line_up_with_the_seed_field_by_field():
    seed = by_kind(seed_documents())
    rendered = by_kind(objects(make_values(draft=True)).values())  # the seed ran the draft
    differing = {path for path in seed.keys() | rendered.keys()
                 if seed.get(path, "<absent>") != rendered.get(path, "<absent>")}

    def listed(path):
        return [prefix for prefix in INTENTIONAL_DIFFERENCES if path[:len(prefix)] == prefix]

    unexplained = sorted((path for path in differing if not listed(path)), key=str)
    assert not unexplained, "differences from the seed without a listed reason:\n" + \
        "\n".join(f"{p}: seed {seed.get(p, '<absent>')!r}, rendered "
                  f"{rendered.get(p, '<absent>')!r}" for p in unexplained)
    stale = [prefix for prefix in INTENTIONAL_DIFFERENCES
             if not any(path[:len(prefix)] == prefix for path in differing)]
    assert not stale, f"listed differences that no longer differ: {stale}"
    # What the seed had and we keep: the GPU claim, resources, ports, mounts, the Service.
    assert len(seed.keys() & rendered.keys()) > 30
    assert all(seed[p] == rendered[p] for p in seed.keys() & rendered.keys() if not listed(p))
    # The listed differences hold what their reasons say.
    node_terms = ("Deployment", *POD, "affinity", "nodeAffinity",
                  "requiredDuringSchedulingIgnoredDuringExecution", "nodeSelectorTerms", 0,
                  "matchExpressions", 0)
    assert rendered[(*node_terms, "key")] == "kubernetes.io/hostname"
    assert rendered[(*node_terms, "operator")] == "In"
    assert tuple(rendered[(*node_terms, "values", i)] for i in range(len(TRAYS))) == TRAYS
    env = ("Deployment", *CONTAINER, "env")
    plain = {path[len(env)].strip("[]"): value for path, value in rendered.items()
             if path[:len(env)] == env and path[len(env) + 1:] == ("value",)}
    assert plain == OFFLINE_ENVIRONMENT
    referenced = {path[len(env)].strip("[]") for path in rendered
                  if path[:len(env)] == env and "secretKeyRef" in path}
    assert referenced == {"VLLM_API_KEY"}
    assert [path[-1] for path in rendered if path[:2] == ("Secret", "data")] == ["VLLM_API_KEY"]
    hub_token = [(path, value) for path, value in rendered.items()
                 if "HF_TOKEN" in repr(path) + repr(value)]
    assert hub_token == [], "the Hub token stays off the cluster"


def test_exec_form_is_the_seeds_shell_command_word_for_word():
    seed = container(seed_documents()[1])
    assert seed["command"] == ["/bin/bash"] and seed["args"][0] == "-c"
    # bash joins backslash-newline continuations before splitting into words.
    seed_argv = shlex.split(seed["args"][1].replace("\\\n", " "))
    rendered = container(objects(make_values(draft=True))["deployment.yaml"])
    # One addition: the seed's vLLM aborted in-flight requests on SIGTERM.
    assert rendered["command"] + rendered["args"] == seed_argv + ["--shutdown-timeout", "60"]


# (c) The container's argv is the one renderer's output, exactly.

@pytest.mark.parametrize("draft", [True, False])
def test_container_args_are_vllm_serve_args_exactly(draft):
    rendered = container(objects(make_values(draft=draft))["deployment.yaml"])
    assert rendered["command"] == ["vllm"]
    assert rendered["args"] == gb200_serve_args(draft)
    assert ("--speculative-config" in rendered["args"]) is draft


def test_args_survive_any_characters_and_overrides():
    args = vllm_serve_args(PROFILES["kimi-k2.6"], model_path=MODEL_MOUNT, draft_path=None,
                           host="0.0.0.0", port=8080, tensor_parallel_size=8,
                           extra_args=["--chat-template-kwargs", '{"a": "b: c # d"}',
                                       "it's", "100%", "$HOME", "yes", "0.90", "null", "<&>"])
    values = make_values(draft=False, serve_args=args)
    rendered = objects(values)
    deployment = rendered["deployment.yaml"]
    # YAML would read yes/null/0.90 unquoted as bool/None/float: every arg stays a string.
    assert container(deployment)["args"] == args
    assert container(deployment)["ports"][0]["containerPort"] == 8080
    assert rendered["service.yaml"]["spec"]["ports"][0]["targetPort"] == 8080
    count = rendered["resourceclaimtemplate.yaml"]["spec"]["spec"]["devices"]["requests"][0]
    assert count["exactly"]["count"] == 8  # the claim follows the tensor-parallel size


def test_sandbox_profile_claims_one_gpu():
    args = vllm_serve_args(PROFILES["sandbox-tiny"], model_path=MODEL_MOUNT, draft_path=None,
                           host="0.0.0.0", port=8000)
    values = make_values(draft=False, serve_args=args, checkpoint_size_bytes=2 * 10**6)
    claim = objects(values)["resourceclaimtemplate.yaml"]
    assert claim["spec"]["spec"]["devices"]["requests"][0]["exactly"] == \
        {"deviceClassName": "gpu.nvidia.com", "allocationMode": "ExactCount", "count": 1}


# (d) The startup probe's window comes from checkpoint size and load rate.

def startup_window(values: ManifestValues) -> int:
    probe = container(objects(values)["deployment.yaml"])["startupProbe"]
    return probe["failureThreshold"] * probe["periodSeconds"]


def test_startup_window_scales_with_checkpoint_size_and_load_rate():
    kimi = make_values(draft=False)
    assert startup_window(kimi) == startup_probe_window_s(595 * 10**9, 1.0e9) == 1790
    bigger = dataclasses.replace(kimi, checkpoint_size_bytes=1200 * 10**9)
    slower = dataclasses.replace(kimi, load_bytes_per_s=0.25e9)
    tiny = dataclasses.replace(kimi, checkpoint_size_bytes=2 * 10**6)
    assert startup_window(tiny) < startup_window(kimi) < startup_window(bigger)
    assert startup_window(kimi) < startup_window(slower)
    # Always longer than the load itself: a probe shorter than the load kills every start.
    for values in (kimi, bigger, slower, tiny):
        assert startup_window(values) > values.checkpoint_size_bytes / values.load_bytes_per_s
    # Growth is linear in size, with a fixed allowance for start-up work that does not scale.
    assert (startup_probe_window_s(2 * 10**12, 1e9) - startup_probe_window_s(10**12, 1e9)) == \
        startup_probe_window_s(10**12, 1e9) - startup_probe_window_s(0, 1e9)


@pytest.mark.parametrize("size, rate", [(-1, 1e9), (10, 0), (10, -5.0)])
def test_startup_window_refuses_nonsense(size, rate):
    with pytest.raises(ValueError):
        startup_probe_window_s(size, rate)


def test_readiness_and_liveness_probe_health_on_the_named_port():
    rendered = container(objects(make_values())["deployment.yaml"])
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert rendered[probe]["httpGet"] == {"path": "/health", "port": "http"}
    assert rendered["ports"] == [{"containerPort": 8000, "name": "http"}]


# (e) Secrets: by reference in the Deployment, values only in the Secret; no Hub token.

def test_no_secret_value_outside_the_secret():
    values = make_values()
    texts = render_manifests(values)
    encoded = base64.b64encode(API_KEY.encode()).decode()
    for name, text in texts.items():
        assert (API_KEY in text or encoded in text) is (name == "secret.yaml"), name
    assert API_KEY not in repr(values)
    env = container(load(texts["deployment.yaml"]))["env"]
    assert [item for item in env if "valueFrom" in item] == [
        {"name": "VLLM_API_KEY", "valueFrom": {"secretKeyRef": {
            "name": "kimi-k26-secrets", "key": "VLLM_API_KEY", "optional": True}}}]


def test_the_hub_token_is_no_input_of_the_objects():
    """The pod reads weights the deploy placed and runs offline: the operator's Hub token has
    no field to ride in, neither in the Secret nor in the container's environment."""
    assert "hf_token" not in {field.name for field in dataclasses.fields(ManifestValues)}
    with pytest.raises(TypeError):
        make_values(hf_token="hf_testTokenValue8c3d1e0f")
    for text in render_manifests(make_values()).values():
        assert "HF_TOKEN" not in text and "HUGGING_FACE_HUB_TOKEN" not in text


def test_secret_holds_exactly_the_values_given():
    def string_data(**secrets):
        secret = objects(make_values(**secrets))["secret.yaml"]
        assert "stringData" not in secret  # a key dropped from it would stay in the cluster
        data = secret.get("data")
        return data and {key: base64.b64decode(value).decode() for key, value in data.items()}

    assert string_data() == {"VLLM_API_KEY": API_KEY}
    assert string_data(api_key=None) is None
    secret = objects(make_values(secret_name="vllm-keys"))
    assert secret["secret.yaml"]["metadata"]["name"] == "vllm-keys"
    assert secret["secret.yaml"]["type"] == "Opaque"
    assert {ref["valueFrom"]["secretKeyRef"]["name"]
            for ref in container(secret["deployment.yaml"])["env"] if "valueFrom" in ref} \
        == {"vllm-keys"}


def test_a_secret_with_no_key_left_is_still_applied_so_old_keys_are_removed():
    """Why the Secret is rendered, and applied, even with nothing in it: the control host
    applies it with `kubectl apply --server-side --field-manager=...` (tasks/vllm_kubernetes.py),
    and under server-side apply a field the same manager applied before and no longer applies
    is removed from the live object, unless another manager also owns it. The keys sit under
    `data`, a map whose keys are owned one by one, so the first apply after this change takes
    out the HF_TOKEN that earlier versions put there (every applied version used `data`: the
    `stringData` of the first render was never applied), and a withdrawn API key goes the same
    way. Were the Secret left out of the apply, or its keys under `stringData` (which the server
    folds into `data` without recording who set them), the old values would stay in the
    cluster. The pod's reference is optional, so an empty Secret starts the pod with an open
    endpoint, as vllm_api_key_file None means. No API server runs here: this checks the
    rendered side of that contract."""
    values = make_values(api_key=None)
    secret = objects(values)["secret.yaml"]
    assert "secret.yaml" in MANIFESTS
    assert secret["kind"] == "Secret" and "data" not in secret and "stringData" not in secret
    (reference,) = [item for item in container(objects(values)["deployment.yaml"])["env"]
                    if "valueFrom" in item]
    assert reference["valueFrom"]["secretKeyRef"]["optional"] is True


@pytest.mark.parametrize("name", ["VLLM_API_KEY", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"])
def test_secret_names_cannot_ride_in_plain_environment(name):
    with pytest.raises(ValueError, match=rf"environment holds \['{name}'\]: secrets come "
                                         "from the Secret only"):
        make_values(environment={name: "sk-or-hf-value"})


def test_plain_environment_is_rendered_before_the_secret_references():
    env = container(objects(make_values(environment={"VLLM_LOGGING_LEVEL": "DEBUG"}))
                    ["deployment.yaml"])["env"]
    plain = {**OFFLINE_ENVIRONMENT, "VLLM_LOGGING_LEVEL": "DEBUG"}
    assert env[:-1] == [{"name": key, "value": plain[key]} for key in sorted(plain)]
    assert env[-1]["name"] == "VLLM_API_KEY" and "valueFrom" in env[-1]


def test_the_pod_runs_offline_with_the_units_list():
    """The same list as vllm.service (tasks/vllm_service.py SERVICE_ENVIRONMENT): the pod
    neither reaches the Hub nor reports usage."""
    env = container(objects(make_values())["deployment.yaml"])["env"]
    plain = {item["name"]: item["value"] for item in env if "value" in item}
    assert plain == OFFLINE_ENVIRONMENT
    assert set(OFFLINE_ENVIRONMENT) == {"HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE",
                                        "VLLM_NO_USAGE_STATS", "DO_NOT_TRACK"}


def test_data_environment_wins_over_the_offline_list_as_in_the_units():
    env = container(objects(make_values(environment={"HF_HUB_OFFLINE": "0"}))
                    ["deployment.yaml"])["env"]
    assert {"name": "HF_HUB_OFFLINE", "value": "0"} in env
    assert [item["name"] for item in env].count("HF_HUB_OFFLINE") == 1


# Volumes, Service, image, node selection.

@pytest.mark.parametrize("draft", [True, False])
def test_host_path_volumes_are_read_only_directories(draft):
    pod = objects(make_values(draft=draft))["deployment.yaml"]["spec"]["template"]["spec"]
    weights = [v for v in pod["volumes"] if v["name"] != "dshm"]
    assert weights == [
        {"name": "model-storage", "hostPath": {"path": "/raid/models/kimi-k2.6",
                                               "type": "Directory"}},
        *([{"name": "eagle-model-storage",
            "hostPath": {"path": "/raid/models/kimi-k2.6-eagle3", "type": "Directory"}}]
          if draft else []),
    ]
    mounts = container(objects(make_values(draft=draft))["deployment.yaml"])["volumeMounts"]
    assert [(m["mountPath"], m.get("readOnly")) for m in mounts] == [
        (MODEL_MOUNT, True), *([(DRAFT_MOUNT, True)] if draft else []), ("/dev/shm", None)]


def test_claim_volumes_mount_a_folder_of_one_claim_read_only():
    deployment = objects(make_values(volume_type="persistentVolumeClaim"))["deployment.yaml"]
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    assert volumes["model-storage"]["persistentVolumeClaim"] == \
        {"claimName": "kimi-models", "readOnly": True}
    mounts = {m["name"]: m for m in container(deployment)["volumeMounts"]}
    assert mounts["model-storage"]["subPath"] == "kimi-k2.6"
    assert mounts["eagle-model-storage"]["subPath"] == "kimi-k2.6-eagle3"


def test_shared_memory_is_memory_backed_and_bounded():
    volumes = objects(make_values(shm_size="8Gi"))["deployment.yaml"]["spec"]["template"]
    (dshm,) = [v for v in volumes["spec"]["volumes"] if v["name"] == "dshm"]
    assert dshm["emptyDir"] == {"medium": "Memory", "sizeLimit": "8Gi"}


@pytest.mark.parametrize("service_type, node_port", [("NodePort", 30180), ("ClusterIP", None)])
def test_service_type_and_node_port(service_type, node_port):
    service = objects(make_values(service_type=service_type))["service.yaml"]
    assert service["spec"]["type"] == service_type
    assert service["spec"]["ports"][0].get("nodePort") == node_port
    assert service["spec"]["selector"] == {"app": "kimi-k26"}


def test_image_pins_a_digest_when_given():
    assert container(objects(make_values())["deployment.yaml"])["image"] == \
        "vllm/vllm-openai:v0.19.1-cu130"
    assert container(objects(make_values(image_digest=DIGEST))["deployment.yaml"])["image"] \
        == f"vllm/vllm-openai:v0.19.1-cu130@{DIGEST}"


def test_node_selector_is_arm64_plus_extras():
    pod = objects(make_values(node_selector={"nvidia.com/gpu.product": "NVIDIA-GB200"}))
    assert pod["deployment.yaml"]["spec"]["template"]["spec"]["nodeSelector"] == \
        {"kubernetes.io/arch": "arm64", "nvidia.com/gpu.product": "NVIDIA-GB200"}


def node_affinity(values: ManifestValues) -> dict | None:
    pod = objects(values)["deployment.yaml"]["spec"]["template"]["spec"]
    return pod.get("affinity")


def test_the_pod_is_pinned_to_the_nodes_that_hold_the_weights():
    """Required, not preferred: on a node without the weights the hostPath volume (type
    Directory) does not exist and the pod would sit there until the progress deadline."""
    affinity = node_affinity(make_values(node_names=["gb200-tray-02", "gb200-tray-01"]))
    assert affinity == {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
        "nodeSelectorTerms": [{"matchExpressions": [{
            "key": "kubernetes.io/hostname", "operator": "In", "values": list(TRAYS)}]}]}}}
    # The order the nodes come in changes nothing, and the arm64 selector stays beside it.
    assert render_manifests(make_values(node_names=TRAYS[::-1])) == \
        render_manifests(make_values(node_names=TRAYS))
    assert objects(make_values())["deployment.yaml"]["spec"]["template"]["spec"][
        "nodeSelector"] == {"kubernetes.io/arch": "arm64"}


def test_claim_volumes_may_run_anywhere_or_pinned():
    assert node_affinity(make_values(volume_type="persistentVolumeClaim", node_names=())) is None
    assert node_affinity(make_values(volume_type="persistentVolumeClaim")) is not None


@pytest.mark.parametrize("overrides, message", [
    ({"draft": False, "draft_volume": "/raid/models/kimi-k2.6-eagle3"}, "disagree"),
    ({"draft_volume": None}, "disagree"),
    ({"name": "Kimi_K26"}, "name="),
    ({"image_digest": "sha256:abc"}, "image_digest"),
    ({"volume_type": "nfs"}, "volume_type"),
    ({"model_sub_path": "kimi-k2.6"}, "persistentVolumeClaim only"),
    ({"service_type": "LoadBalancer"}, "service_type"),
    ({"node_port": 8000}, "node_port"),
    ({"service_type": "ClusterIP", "service_port": 0}, "service_port=0: a TCP port"),
    ({"service_port": 65536}, "service_port=65536"),
    ({"service_port": True}, "service_port=True"),
    ({"node_names": ()}, r"node_names=\(\): the nodes holding the weights"),
    ({"node_names": ["Tray_01"]}, r"node_names \['Tray_01'\]: kubernetes.io/hostname"),
    ({"node_names": ["t" * 64]}, "at most 63 characters"),
    ({"node_names": ["tray-01.", "tray-02"]}, "RFC 1123"),
    ({"node_names": ["tray-01", "tray-01"]}, "each node once"),
    ({"checkpoint_size_bytes": -1}, "checkpoint_size_bytes=-1"),
    ({"load_bytes_per_s": 0}, "load_bytes_per_s=0: a finite rate"),
    ({"load_bytes_per_s": float("nan")}, "load_bytes_per_s=nan"),
    ({"load_bytes_per_s": float("inf")}, "load_bytes_per_s=inf"),
    # A rate given in GB/s: the deadline no longer fits progressDeadlineSeconds (int32).
    ({"load_bytes_per_s": 0.5}, "progressDeadlineSeconds' limit of 2147483647 s"),
    ({"serve_args": ["serve", "/app/model", "--port", "8000"]}, "--tensor-parallel-size"),
    ({"serve_args": gb200_serve_args(False, vllm_port=70000), "draft": False},
     "--port 70000: a TCP port"),
    # Settings.serve_args holds host paths: the pod would look for weights that are not there.
    ({"serve_args": vllm_serve_args(PROFILES["kimi-k2.6"], model_path="/raid/models/kimi-k2.6",
                                    draft_path=None, host="0.0.0.0", port=8000),
      "draft": False}, "model_path='/app/model'"),
    ({"serve_args": vllm_serve_args(PROFILES["kimi-k2.6"], model_path=MODEL_MOUNT,
                                    draft_path="/raid/models/kimi-k2.6-eagle3",
                                    host="0.0.0.0", port=8000)}, "--speculative-config"),
])
def test_values_that_cannot_work_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        make_values(**overrides)


# (f) vLLM's own TLS: the files in the Secret, mounted read-only; the probes over HTTPS.

def test_tls_files_ride_in_the_secret_and_nowhere_else():
    texts = render_manifests(make_values(tls=True))
    secret = load(texts["secret.yaml"])
    assert {key: base64.b64decode(value).decode() for key, value in secret["data"].items()} \
        == {"VLLM_API_KEY": API_KEY, "server.crt": TLS.cert, "server.key": TLS.key,
            "ca.crt": TLS.ca}
    encoded = base64.b64encode(TLS.key.encode()).decode()
    for name, text in texts.items():
        assert ("test-tls-key-5e21c7" in text or encoded in text) is (name == "secret.yaml"), name
    assert "test-tls-key" not in repr(make_values(tls=True))


def test_the_pod_sees_the_tls_files_read_only_where_vllm_is_told_they_are():
    deployment = objects(make_values(tls=True))["deployment.yaml"]
    spec, served = deployment["spec"]["template"]["spec"], container(deployment)
    (volume,) = [item for item in spec["volumes"] if "secret" in item]
    # Only the TLS keys become files (the API key stays an environment reference), 0400.
    assert volume["secret"] == {
        "secretName": "kimi-k26-secrets", "defaultMode": 0o400,
        "items": [{"key": key, "path": key} for key in ("server.crt", "server.key", "ca.crt")]}
    (mount,) = [item for item in served["volumeMounts"] if item["name"] == volume["name"]]
    assert mount == {"name": volume["name"], "mountPath": "/etc/vllm/tls", "readOnly": True}
    flags = served["args"][served["args"].index("--ssl-certfile"):][:4]
    assert flags == ["--ssl-certfile", "/etc/vllm/tls/server.crt",
                     "--ssl-keyfile", "/etc/vllm/tls/server.key"]


@pytest.mark.parametrize("tls, scheme", [(False, None), (True, "HTTPS")])
def test_probes_ask_over_https_exactly_with_tls(tls, scheme):
    """vLLM with TLS answers nothing over plain HTTP: a probe left on HTTP would fail and
    restart the pod forever. The kubelet does not verify a probe's certificate."""
    served = container(objects(make_values(tls=tls))["deployment.yaml"])
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert served[probe]["httpGet"].get("scheme") == scheme, probe
    assert ("secret" in str(objects(make_values(tls=tls))["deployment.yaml"]["spec"]
                            ["template"]["spec"]["volumes"])) is tls


@pytest.mark.parametrize("args_tls, values_tls", [(True, False), (False, True)])
def test_tls_flags_and_files_come_together(args_tls, values_tls):
    with pytest.raises(ManifestValuesError, match="--ssl-certfile/--ssl-keyfile"):
        make_values(serve_args=gb200_serve_args(True, args_tls),
                    tls=TLS if values_tls else None)


def test_tls_flags_pointing_elsewhere_are_refused():
    args = gb200_serve_args(True) + serve_flags("venv")  # the venv unit's credential paths
    with pytest.raises(ManifestValuesError, match="where the pod mounts the Secret"):
        ManifestValues(**{**dataclasses.asdict(make_values(tls=True)), "serve_args": args,
                          "tls": TLS})


# The templates themselves.

def test_each_template_names_its_task_and_holds_one_object():
    templates = sorted(path.name for path in TEMPLATE_DIR.glob("*.j2"))
    assert templates == sorted(name + ".j2" for name in MANIFESTS)
    for name, text in render_manifests(make_values()).items():
        assert text.startswith("# Managed by tasks/vllm_kubernetes.py"), name
        load(text)


def test_pyinfra_files_template_renders_the_same_text():
    from pyinfra.api.util import get_template

    values = make_values()
    contexts = template_context(values)
    for name, text in render_manifests(values).items():
        template = get_template(str(TEMPLATE_DIR / (name + ".j2")))
        assert template.render(**contexts[name + ".j2"]) == text, name


def test_the_pods_termination_grace_follows_vllms_shutdown_timeout():
    """The kubelet waits what the units wait: the drain vLLM is told, plus its exit."""
    def grace(values):
        deployment = objects(values)["deployment.yaml"]
        return deployment["spec"]["template"]["spec"].get("terminationGracePeriodSeconds")

    assert grace(make_values()) == 60 + STOP_MARGIN_S
    longer = gb200_serve_args(True, vllm_shutdown_timeout_s=600)
    assert grace(make_values(serve_args=longer)) == 600 + STOP_MARGIN_S
    # No flag: Kubernetes' default, as the seed had.
    assert grace(make_values(serve_args=gb200_serve_args(True, vllm_shutdown_timeout_s=None))) \
        is None


def test_a_shutdown_timeout_that_is_not_whole_seconds_is_refused():
    args = gb200_serve_args(True, vllm_extra_args=["--shutdown-timeout", "1m"])
    with pytest.raises(ManifestValuesError) as error:
        make_values(serve_args=args)
    assert "serve_args: --shutdown-timeout '1m': whole seconds, 0 or more" in str(error.value)
