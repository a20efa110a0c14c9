"""A test PKI (trustme): a CA, a loopback server certificate, and client certificates."""

from __future__ import annotations

import hashlib
import ssl
from dataclasses import dataclass
from typing import Any

import trustme


@dataclass
class PKI:
    ca: Any
    server: ssl.SSLContext  # asks for (optional) client certificates, trusts the CA for them
    server_der: bytes  # the server certificate, DER: for a Fingerprint pin

    def client(self, name: str | None = None, *, trust: bool = True) -> ssl.SSLContext:
        """A client context: trusts the test CA (or not), shows ``name``'s certificate (or none)."""
        ctx = ssl.create_default_context()
        if trust:
            self.ca.configure_trust(ctx)
        if name is not None:
            self.ca.issue_cert(f"{name}@example.org", common_name=name).configure_cert(ctx)
        return ctx

    @property
    def pin(self) -> bytes:
        return hashlib.sha256(self.server_der).digest()


def make_pki() -> PKI:
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(server)
    ca.configure_trust(server)
    server.verify_mode = ssl.CERT_OPTIONAL
    der = ssl.PEM_cert_to_DER_cert(cert.cert_chain_pems[0].bytes().decode())
    return PKI(ca, server, der)
