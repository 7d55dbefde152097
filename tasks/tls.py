"""vLLM's own TLS (`--ssl-certfile`, `--ssl-keyfile`): the certificate, its key and what clients
trust, from controller files named in data, checked on the controller before anything is
written (a key that does not match its certificate, an expired certificate, a key inside this
repository are problems, each naming host and key).

On the host the three files live in TLS_DIR, root-owned and 0600. The venv runtime's
DynamicUser cannot read them: systemd hands them to it (`LoadCredential=`, under
CREDENTIALS_DIR); the container sees TLS_DIR read-only.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tasks.data_keys import Problem, problem

TLS_DIR = "/etc/vllm/tls"
CERT_FILE, KEY_FILE, CA_FILE = "server.crt", "server.key", "ca.crt"
# Where systemd puts LoadCredential= files for vllm.service (the venv runtime).
CREDENTIALS_DIR = "/run/credentials/vllm.service"
KEYS = ("vllm_tls_cert_file", "vllm_tls_key_file", "vllm_tls_ca_file")


@dataclass(frozen=True)
class Tls:
    """What the deploy puts on a host for vLLM's TLS, and what its clients verify."""

    cert: str  # PEM: the server certificate, then its chain
    key: str  # PEM: the private key (a secret: never logged, 0600 on the host)
    ca: str  # PEM: what clients trust (vllm_tls_ca_file, else the certificate itself)
    names: tuple[str, ...]  # the certificate's DNS names and IP addresses
    not_after: datetime.datetime

    def __repr__(self) -> str:  # the key never reaches a log or a traceback
        return f"Tls(names={self.names}, not_after={self.not_after:%Y-%m-%d})"


def _controller(value: str) -> Path:
    from tasks.settings import controller_path  # tasks/settings.py reads this module
    return Path(os.path.expanduser(controller_path(value)))


def _pem(name: str, key: str, value: str) -> tuple[bytes | None, list[Problem]]:
    path = _controller(value)
    if not path.is_file():
        return None, [problem(name, key, value, "a readable PEM file on the controller")]
    return path.read_bytes(), []


def read_tls(name: str, values: dict, now: datetime.datetime | None = None
             ) -> tuple[Tls | None, list[Problem]]:
    """The host's Tls (None: plain HTTP) and every problem of its three keys."""
    cert_file, key_file, ca_file = (values.get(key) for key in KEYS)
    if cert_file is None and key_file is None:
        if ca_file is not None:
            return None, [problem(name, "vllm_tls_ca_file", ca_file,
                                  "None without vllm_tls_cert_file and vllm_tls_key_file")]
        return None, []
    if cert_file is None or key_file is None:
        missing = "vllm_tls_cert_file" if cert_file is None else "vllm_tls_key_file"
        return None, [problem(name, missing, None, "a controller file: TLS needs both the "
                              "certificate and its key")]
    from tasks.settings import REPO
    found: list[Problem] = []
    key_path = _controller(key_file).resolve()
    if key_path == REPO or REPO in key_path.parents:
        found.append(problem(name, "vllm_tls_key_file", key_file,
                             f"a file outside this repository (it is inside {REPO})"))
    pems = {}
    for key, value in zip(KEYS, (cert_file, key_file, ca_file or cert_file)):
        pems[key], more = _pem(name, key, value)
        found += more
    if found:
        return None, found
    return _checked(name, values, pems, now or datetime.datetime.now(datetime.timezone.utc))


def _checked(name: str, values: dict, pems: dict[str, bytes], now: datetime.datetime
             ) -> tuple[Tls | None, list[Problem]]:
    """Parse the three files and check that they make a usable server: a key of the
    certificate's, still valid, with names in subjectAltName."""
    cert_file, key_file, ca_file = (values.get(key) for key in KEYS)
    try:
        chain = x509.load_pem_x509_certificates(pems["vllm_tls_cert_file"])
    except ValueError as error:
        return None, [problem(name, "vllm_tls_cert_file", cert_file,
                              f"a PEM certificate ({error})")]
    try:
        private = serialization.load_pem_private_key(pems["vllm_tls_key_file"], password=None)
    except (ValueError, TypeError) as error:
        return None, [problem(name, "vllm_tls_key_file", key_file,
                              f"an unencrypted PEM private key ({type(error).__name__})")]
    try:
        x509.load_pem_x509_certificates(pems["vllm_tls_ca_file"])
    except ValueError as error:
        return None, [problem(name, "vllm_tls_ca_file", ca_file, f"PEM certificates ({error})")]
    leaf, found = chain[0], []
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    if private.public_key().public_bytes(serialization.Encoding.DER, spki) != \
            leaf.public_key().public_bytes(serialization.Encoding.DER, spki):
        found.append(problem(name, "vllm_tls_key_file", key_file,
                             f"the private key of {cert_file} (it is another key's)"))
    if leaf.not_valid_after_utc <= now:
        found.append(problem(name, "vllm_tls_cert_file", cert_file,
                             f"a certificate still valid (it expired "
                             f"{leaf.not_valid_after_utc:%Y-%m-%d %H:%M} UTC)"))
    names = _names(leaf)
    if not names:
        found.append(problem(name, "vllm_tls_cert_file", cert_file,
                             "a certificate with subjectAltName names (clients check the "
                             "name they connect to against them)"))
    if found:
        return None, found
    return Tls(cert=pems["vllm_tls_cert_file"].decode(), key=pems["vllm_tls_key_file"].decode(),
               ca=pems["vllm_tls_ca_file"].decode(), names=names,
               not_after=leaf.not_valid_after_utc), []


def _names(certificate: x509.Certificate) -> tuple[str, ...]:
    """The DNS names and IP addresses of a certificate's subjectAltName."""
    try:
        alternative = certificate.extensions.get_extension_for_class(
            x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return ()
    return tuple(alternative.get_values_for_type(x509.DNSName)) + tuple(
        str(address) for address in alternative.get_values_for_type(x509.IPAddress))


def client_ca(name: str, data: dict) -> tuple[str | None, list[Problem]]:
    """What a client of host `name` trusts (vllm_tls_ca_file, else its certificate), read on
    the controller; None when the host serves plain HTTP. The router uses it: its host needs
    no key of the trays'."""
    value = data.get("vllm_tls_ca_file") or data.get("vllm_tls_cert_file")
    if value is None:
        return None, []
    key = "vllm_tls_ca_file" if data.get("vllm_tls_ca_file") else "vllm_tls_cert_file"
    pem, found = _pem(name, key, value)
    return (pem.decode() if pem else None), found


def host_files(found: Tls) -> list[tuple[str, str]]:
    """(path on the host, content) of the three files: each root-owned 0600."""
    return [(f"{TLS_DIR}/{CERT_FILE}", found.cert), (f"{TLS_DIR}/{KEY_FILE}", found.key),
            (f"{TLS_DIR}/{CA_FILE}", found.ca)]


def credentials() -> list[tuple[str, str]]:
    """The venv runtime's LoadCredential= pairs: (name under CREDENTIALS_DIR, host file)."""
    return [("tls-cert", f"{TLS_DIR}/{CERT_FILE}"), ("tls-key", f"{TLS_DIR}/{KEY_FILE}")]


def serve_flags(runtime: str) -> list[str]:
    """vLLM's TLS flags, with the files where ``runtime`` sees them."""
    if runtime == "venv":
        cert, key = (f"{CREDENTIALS_DIR}/{name}" for name, _ in credentials())
    else:
        cert, key = f"{TLS_DIR}/{CERT_FILE}", f"{TLS_DIR}/{KEY_FILE}"
    return ["--ssl-certfile", cert, "--ssl-keyfile", key]
