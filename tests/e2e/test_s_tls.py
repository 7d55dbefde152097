"""vLLM's own TLS on the e2e fleet (three trays behind the router e2er1), with a CA and
certificates this test makes for the trays' veth addresses: every client reaches the trays over
https trusting the CA (the deploy's health wait, the infra checks, the router, a chat from the
controller) while plain http is refused; the key is on the trays only in a root-owned 0600
file, in no command line, unit, journal or output; a new certificate restarts each tray once
and a dry run after it plans nothing; without the keys the fleet serves plain http again.

Runs after the secrets module and before the teardown check (name order); leaves the fleet on
plain http as it found it."""

from __future__ import annotations

import ipaddress
import json
import socket
import ssl
import subprocess
import sys
import urllib.error

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from tasks.tls import CA_FILE, CERT_FILE, CREDENTIALS_DIR, KEY_FILE, TLS_DIR, credentials
from tasks.vllm_router import BACKENDS_CA
from tasks.vllm_service import RELEASE_DIR, RELEASE_TLS
from tests.e2e.common import ENV, ROUTER_PORT, api_key, call, chat, pyinfra
from tests.e2e.test_s_secrets import search_host
from tests.helpers import REPO
from tests.unit.test_tls import certificate, pem


@pytest.fixture(scope="module")
def pki(sandbox, tmp_path_factory) -> dict:
    """A CA, and two certificates (the second for the rotation) naming every tray's veth
    address, their keys 0600 outside the repository."""
    folder = tmp_path_factory.mktemp("tls")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = certificate(ca_key, ca_key, "e2e test CA", "e2e test CA", 30, ca=True)
    names = [x509.IPAddress(ipaddress.ip_address(h["address"])) for h in sandbox["hosts"]]
    made = {"ca": folder / "ca.pem", "keys": []}
    made["ca"].write_bytes(pem(ca))
    for turn in ("first", "second"):
        key = ec.generate_private_key(ec.SECP256R1())
        (folder / f"{turn}.pem").write_bytes(pem(certificate(key, ca_key, "e2e tray", "e2e test CA",
                                                             30, names)))
        key_file = folder / f"{turn}.key"
        key_file.touch(mode=0o600)
        key_file.write_bytes(pem(key))
        # A line of the key's body: what the searches below look for.
        made["keys"].append(pem(key).decode().splitlines()[1])
    return {**made, "folder": folder}


def tls_data(pki, turn: str) -> list[str]:
    return ["--data", f"vllm_tls_cert_file={pki['folder'] / (turn + '.pem')}",
            "--data", f"vllm_tls_key_file={pki['folder'] / (turn + '.key')}",
            "--data", f"vllm_tls_ca_file={pki['ca']}"]


def deployed(*data: str) -> str:
    """A deploy of the whole fleet with `data`; pyinfra's output (it must hold no key)."""
    result, _ = pyinfra("-y", *data)
    return result.stdout + result.stderr


def served_certificate(address: str) -> x509.Certificate:
    return x509.load_pem_x509_certificate(
        ssl.get_server_certificate((address, 8000)).encode())


def https_chat(address: str, key: str, ca) -> int:
    return call(address, "/v1/chat/completions", key, {
        "model": "Kimi-K2.6", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]},
        context=ssl.create_default_context(cafile=str(ca)))[0]


def test_every_client_reaches_the_trays_over_https_and_the_key_stays_in_its_file(
        sandbox, hosts, routers, pki):
    key = api_key(sandbox)
    trays = {h["name"]: h["address"] for h in sandbox["hosts"]}
    output = deployed(*tls_data(pki, "first"))
    for name, address in trays.items():
        assert https_chat(address, key, pki["ca"]) == 200, name
        with pytest.raises((urllib.error.URLError, ConnectionError)):
            chat(address, key)  # plain http to a TLS server: no answer
        with pytest.raises(ssl.SSLCertVerificationError):  # the system's CAs do not vouch
            with socket.create_connection((address, 8000), timeout=10) as plain:
                ssl.create_default_context().wrap_socket(plain, server_hostname=address)
        held = hosts[name].file(f"{TLS_DIR}/{KEY_FILE}")
        assert (held.user, held.group, held.mode) == ("root", "root", 0o600), name
        assert hosts[name].file(f"{TLS_DIR}/{CERT_FILE}").mode == 0o600
        assert hosts[name].file(f"{TLS_DIR}/{CA_FILE}").exists
    # The router reaches the trays over https (trusting the CA it was given) and serves on.
    [router] = routers.values()
    workers = json.loads(router.check_output(
        f"curl -fsS http://{sandbox['routers'][0]['address']}:{ROUTER_PORT}/workers"))
    assert {w["url"]: w["is_healthy"] for w in workers["workers"]} == {
        f"https://{address}:8000": True for address in trays.values()}
    assert chat(sandbox["routers"][0]["address"], key, port=ROUTER_PORT)[0] == 200
    # The infra checks reach each tray over https, from the controller and from the tray.
    infra = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/infra",
         "--inventory", "inventories/sandbox.py",
         *[arg.replace("--data", "--infra-data") for arg in tls_data(pki, "first")]],
        cwd=REPO, env=ENV, capture_output=True, text=True, timeout=900)
    assert infra.returncode == 0, infra.stdout[-5000:]
    # The key: in no output, command line, unit or journal; on a tray only in the root 0600
    # files (the kept release's copy included) and in systemd's copy for the service user
    # (a credential: owner-only, in memory, gone when the service stops).
    credential = f"{CREDENTIALS_DIR}/{credentials()[1][0]}"
    root_only = {f"{TLS_DIR}/{KEY_FILE}", f"{RELEASE_DIR}/{RELEASE_TLS}/{KEY_FILE}"}
    for name, host in {**hosts, **routers}.items():
        found = search_host(name, pki["keys"][:1])
        assert (found["journal"], found["processes"], found["units"]) == (0, 0, 0), name
        assert set(found["files"]) <= root_only | {credential}, (name, found["files"])
        for path in found["files"]:
            held = host.file(path)
            assert held.mode & 0o077 == 0, (name, path, oct(held.mode))
            assert path == credential or (held.user, held.group) == ("root", "root"), path
    assert pki["keys"][0] not in output + infra.stdout + infra.stderr


def test_a_new_certificate_restarts_each_tray_once_and_then_nothing_is_left_to_do(
        sandbox, hosts, pki):
    trays = {h["name"]: h["address"] for h in sandbox["hosts"]}
    since = {name: host.check_output("date +%s") for name, host in hosts.items()}
    output = deployed(*tls_data(pki, "second"))
    second = x509.load_pem_x509_certificate((pki["folder"] / "second.pem").read_bytes())
    for name, address in trays.items():
        assert served_certificate(address) == second, name
        starts = hosts[name].check_output(f"journalctl -u vllm.service --since @{since[name]} "
                                          "-o cat | grep -c '^Started vllm.service' || true")
        assert starts == "1", f"{name}: vllm.service started {starts} times"
    assert pki["keys"][1] not in output
    _, plan = pyinfra("--dry", *tls_data(pki, "second"))
    assert {op["name"]: op["hosts_with_change"] for op in plan["plan"]
            if op["hosts_with_change"]} == {}


def test_without_the_keys_the_fleet_serves_plain_http_again(sandbox, hosts, routers):
    key = api_key(sandbox)
    trays = {h["name"]: h["address"] for h in sandbox["hosts"]}
    deployed()
    for name, address in trays.items():
        assert chat(address, key)[0] == 200, name
        assert not hosts[name].file(TLS_DIR).exists, name
    [router] = routers.values()
    assert not router.file(BACKENDS_CA).exists
    assert chat(sandbox["routers"][0]["address"], key, port=ROUTER_PORT)[0] == 200
