"""TLS between servekit processes on different machines (the Ray runtime's TCP data plane).

Every byte of a TCP connection between two processes of an instance is encrypted and
authenticated with TLS 1.3, both sides presenting the instance's certificate (mutual TLS)
and trusting nothing else. The certificate is pinned through the instance secret: its
Ed25519 key is derived from the secret (HKDF) and the certificate's fields are fixed, so
each process that holds the secret builds the very same certificate on its own (Ed25519
signatures are deterministic) and nothing but the secret is ever distributed. A peer without
the secret cannot complete the handshake, read a frame, or inject one.
"""

from __future__ import annotations

import datetime
import functools
import os
import ssl
import tempfile
from typing import Tuple

# The name in the certificate, and the server name clients ask for (hostnames are not
# checked: the pinned certificate is the identity, whatever address a node has).
SERVER_NAME = "servekit-instance"


def _material(secret: bytes) -> Tuple[bytes, bytes]:
    """The instance's certificate and private key (PEM), the same from the same secret."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF
    from cryptography.x509.oid import NameOID

    seed = HKDF(algorithm=hashes.SHA256(), length=48, salt=None,
                info=b"servekit instance certificate").derive(secret)
    key = Ed25519PrivateKey.from_private_bytes(seed[:32])
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, SERVER_NAME)])
    utc = datetime.timezone.utc
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name)
        .public_key(key.public_key())
        .serial_number(int.from_bytes(seed[32:], "big") >> 1 or 1)
        .not_valid_before(datetime.datetime(2000, 1, 1, tzinfo=utc))
        .not_valid_after(datetime.datetime(9999, 12, 31, tzinfo=utc))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, None)
    )
    return (certificate.public_bytes(serialization.Encoding.PEM),
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()))


def _context(secret: bytes, purpose: int) -> ssl.SSLContext:
    certificate, key = _material(secret)
    server = purpose == ssl.PROTOCOL_TLS_SERVER
    context = ssl.SSLContext(purpose)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    # load_cert_chain reads files only: the key lives in an owner-only file for a moment.
    descriptor, path = tempfile.mkstemp(prefix="servekit-", suffix=".pem")
    try:
        with os.fdopen(descriptor, "wb") as file:
            file.write(certificate + key)
        context.load_cert_chain(path)
    finally:
        os.unlink(path)
    context.load_verify_locations(cadata=certificate.decode("ascii"))
    context.verify_mode = ssl.CERT_REQUIRED
    if not server:
        context.check_hostname = False
    return context


@functools.lru_cache(maxsize=4)
def server_context(secret: bytes) -> ssl.SSLContext:
    """The context a listener of the instance accepts TLS connections with."""
    return _context(secret, ssl.PROTOCOL_TLS_SERVER)


@functools.lru_cache(maxsize=4)
def client_context(secret: bytes) -> ssl.SSLContext:
    """The context a process of the instance opens TLS connections with."""
    return _context(secret, ssl.PROTOCOL_TLS_CLIENT)
