"""tasks/tls.py: the certificate, key and CA read and checked on the controller. The
certificates are made here, with the same library the check uses."""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tasks import tls
from tasks.data_keys import DataError
from tests.unit.test_vllm_router import wheelhouse  # noqa: F401 (a fixture)

NOW = datetime.datetime.now(datetime.timezone.utc)  # certificates made now stay valid


def certificate(key, issuer_key, subject: str, issuer: str, days: int, names=(), ca=False):
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
               .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(NOW - datetime.timedelta(days=1))
               .not_valid_after(NOW + datetime.timedelta(days=days))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def pem(thing) -> bytes:
    if isinstance(thing, x509.Certificate):
        return thing.public_bytes(serialization.Encoding.PEM)
    return thing.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                               serialization.NoEncryption())


@pytest.fixture
def files(tmp_path) -> dict:
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = certificate(ca_key, ca_key, "test CA", "test CA", 30, ca=True)
    names = [x509.DNSName("tray-01"), x509.IPAddress(ipaddress.ip_address("10.0.0.1"))]
    server = certificate(key, ca_key, "tray-01", "test CA", 10, names)
    expired = certificate(key, ca_key, "tray-01", "test CA", -1, names)
    nameless = certificate(key, ca_key, "tray-01", "test CA", 10)
    out = {}
    for label, thing in (("ca", ca), ("cert", server), ("key", key), ("expired", expired),
                         ("nameless", nameless), ("other_key", ca_key)):
        out[label] = tmp_path / f"{label}.pem"
        out[label].write_bytes(pem(thing))
    return {label: str(path) for label, path in out.items()}


def values(cert=None, key=None, ca=None) -> dict:
    return {"vllm_tls_cert_file": cert, "vllm_tls_key_file": key, "vllm_tls_ca_file": ca}


def test_no_files_is_plain_http():
    assert tls.read_tls("h", values()) == (None, [])


def test_a_matching_pair_with_its_ca_is_read_and_never_shows_its_key(files):
    found, problems = tls.read_tls("h", values(files["cert"], files["key"], files["ca"]), NOW)
    assert problems == []
    assert found.names == ("tray-01", "10.0.0.1")
    assert found.ca == Path(files["ca"]).read_text()
    assert "PRIVATE KEY" in found.key and "PRIVATE" not in repr(found)


def test_without_a_ca_the_certificate_itself_is_trusted(files):
    found, _ = tls.read_tls("h", values(files["cert"], files["key"]), NOW)
    assert found.ca == found.cert


@pytest.mark.parametrize("given, key, says", [
    (dict(cert="cert"), "vllm_tls_key_file", "TLS needs both"),
    (dict(key="key"), "vllm_tls_cert_file", "TLS needs both"),
    (dict(ca="ca"), "vllm_tls_ca_file", "None without vllm_tls_cert_file"),
    (dict(cert="cert", key="other_key"), "vllm_tls_key_file", "it is another key's"),
    (dict(cert="expired", key="key"), "vllm_tls_cert_file", "it expired"),
    (dict(cert="nameless", key="key"), "vllm_tls_cert_file", "subjectAltName"),
    (dict(cert="key", key="key"), "vllm_tls_cert_file", "a PEM certificate"),
    (dict(cert="cert", key="cert"), "vllm_tls_key_file", "an unencrypted PEM private key"),
])
def test_each_bad_input_is_one_problem_naming_host_and_key(files, given, key, says):
    found, problems = tls.read_tls("tray-01", values(
        **{name: files[label] for name, label in given.items()}), NOW)
    assert found is None
    assert [problem.key for problem in problems] == [key]
    assert says in str(problems[0]) and "tray-01" in str(problems[0])
    assert "PRIVATE KEY" not in str(problems[0])


def test_a_key_inside_the_repository_is_refused(files):
    _, problems = tls.read_tls("h", values(files["cert"], "tests/fixtures/no-such-key.pem"), NOW)
    assert "outside this repository" in str(problems[0])


def test_each_runtime_sees_the_files_where_they_are_put():
    assert tls.serve_flags("venv") == [
        "--ssl-certfile", "/run/credentials/vllm.service/tls-cert",
        "--ssl-keyfile", "/run/credentials/vllm.service/tls-key"]
    assert tls.serve_flags("docker") == [
        "--ssl-certfile", "/etc/vllm/tls/server.crt", "--ssl-keyfile", "/etc/vllm/tls/server.key"]


# ---- what the host's settings make of it ----------------------------------------------------

@pytest.fixture
def tls_data(tmp_path, controller_folders, files):
    from tests.helpers import group_data
    key = tmp_path / "api-key"
    key.write_text("s3cret-key\n")
    data = group_data("sandbox")
    data.update(controller_folders, vllm_api_key_file=str(key), vllm_tls_cert_file=files["cert"],
                vllm_tls_key_file=files["key"], vllm_tls_ca_file=files["ca"])
    return data


@pytest.mark.parametrize("runtime, where", [
    ("venv", "/run/credentials/vllm.service/tls-"), ("docker", "/etc/vllm/tls/server.")])
def test_the_server_is_told_where_its_runtime_sees_the_files(tls_data, runtime, where):
    from tasks.settings import read_settings
    from tests.helpers import FakeHost
    tls_data["vllm_runtime"] = runtime
    if runtime == "docker":
        tls_data.update(vllm_image={"x86_64": "vllm/vllm-openai:v0.19.1"},
                        vllm_image_tarball=None)
    settings = read_settings(FakeHost("tray-01", tls_data))
    flags = settings.serve_args[settings.serve_args.index("--ssl-certfile"):][:4]
    assert flags[1].startswith(where) and flags[3].startswith(where)
    assert settings.tls.names == ("tray-01", "10.0.0.1")
    assert "PRIVATE KEY" not in " ".join(settings.serve_args)


def test_a_pod_is_told_where_the_secret_is_mounted(tls_data):
    """The kubernetes runtime: the files ride in the Deployment's Secret (tasks/k8s_manifests.py,
    tests/unit/test_vllm_kubernetes.py), mounted where the docker runtime puts them."""
    from tasks.settings import read_settings
    from tests.helpers import FakeHost
    tls_data.update(vllm_runtime="kubernetes")
    settings = read_settings(FakeHost("tray-01", tls_data))
    assert settings.serve_args_at(model_path="/app/model", draft_path=None)[-4:] == \
        tls.serve_flags("docker")
    assert settings.tls.names == ("tray-01", "10.0.0.1")


def test_the_venv_unit_loads_the_files_as_credentials_and_the_container_mounts_them(tls_data):
    from tasks import vllm_container
    from tasks.settings import read_settings
    from tests.helpers import FakeHost
    from pyinfra.api.util import get_template
    from tasks.settings import TEMPLATES
    settings = read_settings(FakeHost("tray-01", tls_data))
    rendered = get_template(str(TEMPLATES / "vllm.service.j2")).render(
        served_name="s", profile_name="p", stop_timeout_s=90, restart_backoff=True,
        env_file="/etc/vllm/vllm.env", environment=[], exec_start="/bin/true",
        credentials=tls.credentials())
    assert "\nLoadCredential=tls-cert:/etc/vllm/tls/server.crt\n" in rendered
    assert "\nLoadCredential=tls-key:/etc/vllm/tls/server.key\n" in rendered
    argv = vllm_container.container_argv(settings, "image:tag", {}, 90)
    assert "/etc/vllm/tls:/etc/vllm/tls:ro" in argv


def tls_answers(found: tls.Tls, stale: str | None = None) -> dict:
    """File and Sha256File answers of a tray holding ``found``'s files, root 0600; the file
    named ``stale`` with other content (a certificate before its rotation)."""
    import hashlib

    from pyinfra.facts.files import File, Sha256File

    from tests.helpers import fact_command
    from tests.unit.test_vllm_container import stat_answer
    answers = {}
    for path, content in tls.host_files(found):
        content = "old\n" if path == stale else content
        answers[fact_command(File, path=path)] = [stat_answer(path, "-rw-------", len(content))]
        answers[fact_command(Sha256File, path=path)] = [
            f"{hashlib.sha256(content.encode()).hexdigest()}  {path}"]
    return answers


def test_a_rotated_certificate_is_written_root_only_and_restarts_vllm_once(files):
    from tasks.settings import read_settings
    from tests.helpers import FakeHost
    from tests.unit.test_vllm_container import (LATE_MARK, START, docker_data, served_tray,
                                                 service_plan)
    data = docker_data(vllm_tls_cert_file=files["cert"], vllm_tls_key_file=files["key"],
                       vllm_tls_ca_file=files["ca"])
    found = read_settings(FakeHost("tray-01", data)).tls
    current = {**served_tray(data), **tls_answers(found)}
    assert service_plan(data, current) == {}
    cert = f"{tls.TLS_DIR}/{tls.CERT_FILE}"
    plan = service_plan(data, {**served_tray(data), **tls_answers(found, stale=cert)})
    assert list(plan)[:3] == [LATE_MARK, f"Install vLLM TLS file {cert}", START]
    assert plan[START] == ["systemctl restart vllm.service"]
    assert f"install -m 0600 -o root -g root /dev/null {cert}.partial" in \
        plan[f"Install vLLM TLS file {cert}"][0]
    # The health wait, and the restore of the last good release with the TLS files it served
    # with, reach vLLM by a name of its certificate, trusting the CA.
    wait = plan["Wait for vLLM /health"][0]
    curl = ("curl -fs -o /dev/null --max-time 5 --cacert /etc/vllm/tls/ca.crt --resolve "
            "tray-01:8000:127.0.0.1 https://tray-01:8000/health")
    assert wait.count(curl) == 2, wait
    assert "cp -a /var/lib/vllm-release/tls /etc/vllm/tls" in wait


def test_the_health_wait_trusts_the_ca_and_a_name_of_the_certificate(tls_data):
    from tasks import vllm_service
    from tasks.settings import read_settings
    from tests.helpers import FakeHost
    settings = read_settings(FakeHost("tray-01", tls_data))
    assert settings.health_url == f"https://tray-01:{settings.port}/health"
    assert settings.local_curl_options == [
        "--cacert", "/etc/vllm/tls/ca.crt", "--resolve", f"tray-01:{settings.port}:127.0.0.1"]
    # The release kept carries the TLS files it served with (the restore: below), and how it
    # answers /health, for a restore after the keys changed or went.
    probe = vllm_service.health_probe(settings.health_url, settings.local_curl_options)
    assert probe == ("curl -fs -o /dev/null --max-time 5 --cacert /etc/vllm/tls/ca.crt "
                     f"--resolve tray-01:{settings.port}:127.0.0.1 "
                     f"https://tray-01:{settings.port}/health")
    kept = vllm_service.keep_release_script("/opt/vllm/venv", probe, [settings.model_dir])
    assert "cp -a /etc/vllm/tls /var/lib/vllm-release.new/tls" in kept
    assert f"printf '%s\\n' '{probe}' > /var/lib/vllm-release.new/health-probe" in kept


def test_a_certificate_that_does_not_name_the_hosts_address_is_refused(tls_data):
    """The controller's checks (and a router) reach a tray by its ssh_hostname, else its
    name: a certificate without it would fail every one of them after the deploy."""
    from tasks.data_keys import DataError
    from tasks.settings import read_settings
    from tests.helpers import FakeHost
    assert read_settings(FakeHost("tray-01", {**tls_data, "ssh_hostname": "10.0.0.1"})).tls
    with pytest.raises(DataError) as error:
        read_settings(FakeHost("tray-02", {**tls_data, "ssh_hostname": "10.0.0.2"}))
    assert ("tray-02: vllm_tls_cert_file: " in str(error.value)
            and "a certificate naming 10.0.0.2, the address the controller reaches this host "
            "by (it names tray-01, 10.0.0.1)" in str(error.value))


def test_the_router_reaches_tls_trays_over_https_trusting_their_ca_and_holding_no_key(
        files, wheelhouse):  # noqa: F811
    """vllm-router verifies https backends with OpenSSL's default paths: its unit points
    SSL_CERT_FILE at the trays' CAs (each once). Checked against the real router by hand:
    without it, a backend signed by a private CA never becomes healthy."""
    from tasks.data_keys import DEFAULTS
    from tasks.vllm_router import BACKENDS_CA, settings_from, unit_text
    from tests.unit.test_vllm_router import router_data
    secure = {**DEFAULTS, **values(files["cert"], files["key"], files["ca"])}
    trays = [("tray-01", {**secure, "ssh_hostname": "10.0.0.1"}),
             ("tray-02", {**secure, "ssh_hostname": "10.0.0.2"}),
             ("tray-03", {**DEFAULTS, "ssh_hostname": "10.0.0.3"})]
    settings = settings_from("router-01", router_data(wheelhouse), trays)
    assert settings.backends == ("https://10.0.0.1:8000", "https://10.0.0.2:8000",
                                 "http://10.0.0.3:8000")
    assert settings.backends_ca == Path(files["ca"]).read_text()  # once for two trays
    unit = unit_text(settings)
    assert f"\nEnvironment=SSL_CERT_FILE={BACKENDS_CA}\n" in unit
    assert "PRIVATE KEY" not in unit + settings.backends_ca
    plain = settings_from("router-01", router_data(wheelhouse), trays[2:])
    assert plain.backends_ca == "" and "SSL_CERT_FILE" not in unit_text(plain)
    missing = {**secure, "vllm_tls_ca_file": str(Path(files["ca"]).parent / "gone.pem")}
    with pytest.raises(DataError) as error:
        settings_from("router-01", router_data(wheelhouse), [("tray-01", missing)])
    assert "tray-01: vllm_tls_ca_file: " in str(error.value)


@pytest.mark.parametrize("runtime", ["venv", "docker"])
def test_bench_reaches_vllm_by_its_address_trusting_the_ca(tls_data, runtime):
    """`vllm bench serve` (aiohttp: OpenSSL's default paths) gets SSL_CERT_FILE; the
    container sees the CA file alone, never the folder that holds the key."""
    from tasks import bench
    from tasks.settings import read_settings
    from tests.helpers import FakeHost
    tls_data.update(ssh_hostname="10.0.0.1", vllm_runtime=runtime)
    if runtime == "docker":
        tls_data.update(vllm_image={"x86_64": "vllm/vllm-openai:v0.19.1"},
                        vllm_image_tarball=None)
    settings = read_settings(FakeHost("tray-01", tls_data))
    assert settings.local_url == f"https://10.0.0.1:{settings.port}"
    argv = bench.client_argv(settings, "/var/tmp/bench/x", "image:tag")
    assert "SSL_CERT_FILE=/etc/vllm/tls/ca.crt" in argv  # env's argument, or docker's --env
    mounts = [argv[i + 1] for i, arg in enumerate(argv) if arg == "--volume"]
    assert not [m for m in mounts if m.startswith("/etc/vllm/tls:")]
    if runtime == "docker":
        assert "/etc/vllm/tls/ca.crt:/etc/vllm/tls/ca.crt:ro" in mounts
    assert bench.local_curl(settings) == (
        "curl -fsS --max-time 30 --cacert /etc/vllm/tls/ca.crt "
        f"--resolve 10.0.0.1:{settings.port}:127.0.0.1")
