"""Throw-away TLS material for tests (trustme CAs and localhost certificates)."""

from __future__ import annotations

import ssl
from pathlib import Path

import trustme

from worker.devserver import TlsMaterial, make_tls_material

__all__ = ["TlsMaterial", "misnamed_tls_material", "tls_material", "untrusted_tls_material"]


def tls_material(directory: Path) -> TlsMaterial:
    """A CA (written to ``directory/ca.pem``) and a server context for localhost.

    Clients given ``ca_pem_path`` as their CA file trust the server.
    """
    return make_tls_material(directory, ca_filename="ca.pem")


def untrusted_tls_material(directory: Path) -> TlsMaterial:
    """Material from a second, unrelated CA (written to ``directory/untrusted-ca.pem``).

    A server using this context presents a certificate that a client trusting only
    :func:`tls_material`'s CA must reject ("certificate from unknown CA").
    """
    return make_tls_material(directory, ca_filename="untrusted-ca.pem")


MISNAMED_IDENTITY = "mail.example.test"


def misnamed_tls_material(directory: Path) -> TlsMaterial:
    """A CA (``directory/misnamed-ca.pem``) and a certificate for ``mail.example.test`` only.

    A client that trusts this CA but connects by ``127.0.0.1`` or ``localhost`` must refuse
    the certificate: the CA is right, the name is not.
    """
    directory.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA()
    cert = ca.issue_cert(MISNAMED_IDENTITY)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(context)
    ca_pem_path = directory / "misnamed-ca.pem"
    ca.cert_pem.write_to_path(str(ca_pem_path))
    return TlsMaterial(ca_pem_path=ca_pem_path, server_context=context)
