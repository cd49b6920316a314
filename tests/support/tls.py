"""Throw-away TLS material for tests (trustme CAs and localhost certificates)."""

from __future__ import annotations

from pathlib import Path

from worker.devserver import TlsMaterial, make_tls_material

__all__ = ["TlsMaterial", "tls_material", "untrusted_tls_material"]


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
