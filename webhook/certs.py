"""A CA and a serving certificate for the webhook Service (`keymount certs`).

The API server verifies the webhook against the configuration's caBundle and the
Service DNS name it dials, `<service>.<namespace>.svc` (k8s.io/apiserver webhook
client), so the serving certificate names every form of it; `--ip` adds IP SANs for
`clientConfig.url` registrations such as https://127.0.0.1:8443 in local tests.
"""

from __future__ import annotations

import base64
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .files import replace_file


@dataclass(frozen=True, slots=True)
class CertFiles:
    ca_cert: Path
    ca_key: Path
    tls_cert: Path
    tls_key: Path

    @property
    def ca_bundle(self) -> str:
        return base64.b64encode(self.ca_cert.read_bytes()).decode()


def service_dns_names(service: str, namespace: str) -> list[str]:
    return [service, f"{service}.{namespace}", f"{service}.{namespace}.svc",
            f"{service}.{namespace}.svc.cluster.local"]


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def build_certificates(*, service: str, namespace: str, ips: Sequence[str] = (),
                       dns_names: Sequence[str] = (), days: int = 365,
                       now: datetime | None = None) -> dict[str, bytes]:
    """PEM bytes for ca.crt, ca.key, tls.crt, tls.key, and client.crt/client.key for the
    API server to present when keymount runs with --client-ca (pure apart from
    randomness)."""
    now = now or datetime.now(UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    # A distinct name per CA: a client trusting an old and a new CA during a rollover
    # finds the issuer by name, and two CAs of one name would shadow each other.
    ca_name = _name(f"keymount-ca {service}.{namespace} {os.urandom(4).hex()}")
    ca_cert = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5)).not_valid_after(now + timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
            key_encipherment=False, data_encipherment=False, key_agreement=False,
            encipher_only=False, decipher_only=False), critical=True)
        .sign(ca_key, hashes.SHA256()))
    tls_key = ec.generate_private_key(ec.SECP256R1())
    client_key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = [x509.DNSName(n) for n in
                                    [*service_dns_names(service, namespace), *dns_names]]
    sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
    tls_cert = (
        x509.CertificateBuilder().subject_name(_name(f"{service}.{namespace}.svc"))
        .issuer_name(ca_name).public_key(tls_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5)).not_valid_after(now + timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256()))
    # For the API server to present to keymount (serve --client-ca ca.crt).
    client_cert = (
        x509.CertificateBuilder().subject_name(_name("kube-apiserver"))
        .issuer_name(ca_name).public_key(client_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5)).not_valid_after(now + timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256()))

    def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
        return key.private_bytes(serialization.Encoding.PEM,
                                 serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())

    return {
        "ca.crt": ca_cert.public_bytes(serialization.Encoding.PEM),
        "ca.key": key_pem(ca_key),
        "tls.crt": tls_cert.public_bytes(serialization.Encoding.PEM),
        "tls.key": key_pem(tls_key),
        "client.crt": client_cert.public_bytes(serialization.Encoding.PEM),
        "client.key": key_pem(client_key),
    }


def write_certificates(out: Path, pems: dict[str, bytes]) -> CertFiles:
    """Write atomically; private keys are created 0600 and never world-readable."""
    out.mkdir(parents=True, exist_ok=True)
    for name, data in pems.items():
        replace_file(out / name, data, mode=0o600 if name.endswith(".key") else 0o644)
    return CertFiles(out / "ca.crt", out / "ca.key", out / "tls.crt", out / "tls.key")


# The webhook names of manifests/base; the patch sets the caBundle of each of them.
WEBHOOKS = {"MutatingWebhookConfiguration": ["inject.keymount.io", "numbers.keymount.io"],
            "ValidatingWebhookConfiguration": ["pods.keymount.io", "secrets.keymount.io",
                                               "policies.keymount.io"]}


def build_ca_bundle_patch(ca_bundle: str) -> str:
    """Strategic-merge patches (webhooks merge by name) for kustomize `patches:`."""
    import yaml
    documents = [{"apiVersion": "admissionregistration.k8s.io/v1", "kind": kind,
                  "metadata": {"name": "keymount"},
                  "webhooks": [{"name": name, "clientConfig": {"caBundle": ca_bundle}}
                               for name in names]}
                 for kind, names in WEBHOOKS.items()]
    text: str = ("# Written by `keymount certs --kustomize-patch`: the CA bundle is public.\n"
            + yaml.safe_dump_all(documents, sort_keys=False))
    return text
