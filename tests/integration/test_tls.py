"""DICOM TLS on the receiver: DCMTK echoscu/storescu with +tls succeed with a certificate from the
node's CA and fail without one (anonymous TLS, plain TCP, or a certificate from another CA)."""

from __future__ import annotations

import datetime
import subprocess

import pytest

from conftest import make_mr_instances, require_tools, storescu
from node_helpers import ECHOSCU_BIN, NodeProcess

pytestmark = pytest.mark.integration


def make_ca(name: str):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))
    return key, cert


def issue(ca, name: str, server: bool):
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    ca_key, ca_cert = ca
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
               .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=30))
               .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server
                                                     else ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False))
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
    return key, builder.sign(ca_key, hashes.SHA256())


def write_pem(tmp_path, stem, key, cert):
    from cryptography.hazmat.primitives import serialization

    k, c = tmp_path / f"{stem}.key", tmp_path / f"{stem}.pem"
    if key is not None:
        k.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                        serialization.NoEncryption()))
    c.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return k, c


@pytest.fixture
def pki(tmp_path):
    ca = make_ca("qsmnode test CA")
    other = make_ca("some other CA")
    _, ca_pem = write_pem(tmp_path, "ca", None, ca[1])
    return {
        "ca": ca_pem,
        "server": write_pem(tmp_path, "server", *issue(ca, "qsmnode", server=True)),
        "client": write_pem(tmp_path, "client", *issue(ca, "scanner", server=False)),
        "stranger": write_pem(tmp_path, "stranger", *issue(other, "stranger", server=False)),
    }


def echo(port, *args):
    return subprocess.run([ECHOSCU_BIN, "-aet", "SCANNER", "-aec", "QSMNODE", *args, "127.0.0.1", str(port)],
                          capture_output=True, text=True, timeout=60)


def test_tls_with_client_certificates(tmp_path, free_port, pki):
    require_tools(ECHOSCU_BIN, "/usr/bin/storescu")
    key, cert = pki["server"]
    node = NodeProcess(tmp_path / "node", free_port(), tls={
        "certificate": str(cert), "private_key": str(key), "ca_certificates": str(pki["ca"]),
        "require_client_certificate": True})
    node.start(echo=False)
    try:
        ck, cc = pki["client"]
        right = ["+tls", str(ck), str(cc), "+cf", str(pki["ca"])]
        ok = echo(node.port, *right)
        assert ok.returncode == 0, ok.stdout + ok.stderr
        paths = make_mr_instances(tmp_path / "in", 3, rows=16)
        sent = storescu(paths, node.port, extra_args=right)
        assert sent.returncode == 0, sent.stdout + sent.stderr
        assert len(node.spool_files(3)) == 3

        assert echo(node.port, "+tla", "+cf", str(pki["ca"])).returncode != 0  # TLS, but no client cert
        assert echo(node.port).returncode != 0  # plain TCP to a TLS port
        sk, sc = pki["stranger"]
        assert echo(node.port, "+tls", str(sk), str(sc), "+cf", str(pki["ca"])).returncode != 0  # wrong CA
        # the node survived all of that
        again = echo(node.port, *right)
        assert again.returncode == 0, again.stdout + again.stderr
    finally:
        assert node.stop() == 0


def test_tls_without_client_certificates(tmp_path, free_port, pki):
    require_tools(ECHOSCU_BIN)
    key, cert = pki["server"]
    node = NodeProcess(tmp_path / "node", free_port(), tls={"certificate": str(cert), "private_key": str(key)})
    node.start(echo=False)
    try:
        assert echo(node.port, "+tla", "+cf", str(pki["ca"])).returncode == 0
        # the client checks the node's certificate: without the CA it refuses the node
        assert echo(node.port, "+tla").returncode != 0
    finally:
        node.stop()
