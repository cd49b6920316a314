"""An embedded development SMTP server, used by ``mailsender demo``.

The server is built on aiosmtpd and runs its asyncio loop in a background thread
(an aiosmtpd :class:`~aiosmtpd.controller.Controller`). Every accepted mail is
written to an *outbox* directory as ``<timestamp>-<counter>.eml`` (the DATA bytes
exactly as received) plus a sidecar ``<timestamp>-<counter>.json`` describing the
envelope. Both files are written atomically (temporary file, then rename); the
sidecar is renamed into place first, so a watcher that sees the ``.eml`` can
rely on the ``.json`` being there.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import ssl
import threading
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import trustme
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

__all__ = [
    "DevSmtpServer",
    "PortController",
    "TlsMaterial",
    "make_tls_material",
    "quiet_aiosmtpd_log",
]

#: Host names the throw-away server certificate is valid for.
TLS_IDENTITIES: tuple[str, ...] = ("localhost", "127.0.0.1")


@dataclass(frozen=True)
class TlsMaterial:
    """A throw-away CA and a server certificate for ``localhost`` and ``127.0.0.1``.

    Attributes:
        ca_pem_path: The CA certificate (PEM) that clients must trust (``caFile``).
        server_context: A server-side :class:`ssl.SSLContext` holding the
            certificate chain and private key, ready for STARTTLS.
    """

    ca_pem_path: Path
    server_context: ssl.SSLContext


def make_tls_material(directory: Path, *, ca_filename: str = "ca.pem") -> TlsMaterial:
    """Create a fresh CA and a server certificate for localhost with trustme.

    Args:
        directory: Where the CA certificate is written (created if missing).
        ca_filename: File name of the CA certificate inside ``directory``.

    Returns:
        The CA PEM path and a server SSL context presenting the new certificate.
    """
    directory.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA()
    cert = ca.issue_cert(*TLS_IDENTITIES)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(context)
    ca_pem_path = directory / ca_filename
    ca.cert_pem.write_to_path(str(ca_pem_path))
    return TlsMaterial(ca_pem_path=ca_pem_path, server_context=context)


class PortController(Controller):
    """An aiosmtpd :class:`Controller` that supports ``port=0``.

    With ``port=0`` the operating system picks a free port when the listener is
    bound (no race between "find a free port" and "bind it"); :attr:`port` holds
    the real port once :meth:`start` has returned.
    """

    def _trigger_server(self) -> None:
        """Learn the bound port, then let aiosmtpd open its warm-up connection."""
        server = self.server
        if isinstance(server, asyncio.Server) and server.sockets:
            self.port = int(server.sockets[0].getsockname()[1])
        super()._trigger_server()  # type: ignore[no-untyped-call]


class _DropLoginDataWarning(logging.Filter):
    """Drop aiosmtpd's own "Session.login_data is deprecated" noise (logged on every AUTH)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Session.login_data is deprecated")


def quiet_aiosmtpd_log() -> None:
    """Install :class:`_DropLoginDataWarning` on aiosmtpd's ``mail.log`` logger once."""
    logger = logging.getLogger("mail.log")
    if not any(isinstance(f, _DropLoginDataWarning) for f in logger.filters):
        logger.addFilter(_DropLoginDataWarning())


def _write_atomically(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


class _DevHandler:
    """aiosmtpd handler: refuses listed recipients and stores mails in the outbox.

    Note: aiosmtpd treats every attribute named ``handle_*`` as a hook and every
    attribute named ``auth_*`` as an AUTH mechanism; do not add others.
    """

    def __init__(self, outbox: Path, refuse: Collection[str]) -> None:
        self._outbox = outbox
        self._refuse = frozenset(addr.casefold() for addr in refuse)
        self._counter = itertools.count(1)
        self._lock = threading.Lock()

    async def handle_EHLO(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        """Hide the bare ``AUTH`` line aiosmtpd emits when no mechanism is enabled."""
        session.host_name = hostname  # a custom EHLO hook must do this itself
        return [line for line in responses if line.rstrip() != "250-AUTH"]

    async def handle_RCPT(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        """Refuse recipients listed in ``refuse``; accept everyone else."""
        if address.casefold() in self._refuse:
            return f"550 5.1.1 <{address}>: Recipient address rejected: User unknown"
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        """Write the mail and its sidecar to the outbox."""
        data = envelope.original_content or b""
        auth_user = session.auth_data if session.authenticated else None
        meta: dict[str, Any] = {
            "mail_from": envelope.mail_from,
            "rcpt_tos": list(envelope.rcpt_tos),
            "tls": session.ssl is not None,
            "auth_user": auth_user if isinstance(auth_user, str) else None,
        }
        with self._lock:
            number = next(self._counter)
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
        stem = f"{stamp}-{number:06d}"
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self._store, stem, data, meta)
        return f"250 2.0.0 OK queued as {stem}"

    def _store(self, stem: str, data: bytes, meta: dict[str, Any]) -> None:
        self._outbox.mkdir(parents=True, exist_ok=True)
        sidecar = json.dumps(meta, indent=2, sort_keys=True).encode("utf-8")
        _write_atomically(self._outbox / f"{stem}.json", sidecar)
        _write_atomically(self._outbox / f"{stem}.eml", data)


def _make_authenticator(users: Mapping[str, str]) -> Any:
    """Build an aiosmtpd ``authenticator`` checking login/password against ``users``."""
    table = dict(users)

    def authenticator(
        server: SMTP, session: Session, envelope: Envelope, mechanism: str, auth_data: Any
    ) -> AuthResult:
        if not isinstance(auth_data, LoginPassword):
            return AuthResult(success=False, handled=False)
        login = auth_data.login.decode("utf-8", errors="replace")
        password = auth_data.password.decode("utf-8", errors="replace")
        if login in table and table[login] == password:
            return AuthResult(success=True, auth_data=login)
        return AuthResult(success=False, handled=False)

    return authenticator


class DevSmtpServer:
    """An embedded SMTP server that writes every accepted mail to ``outbox``.

    * With ``tls`` it offers STARTTLS and refuses MAIL before TLS
      (``530 Must issue a STARTTLS command first``).
    * With ``users`` it offers AUTH PLAIN and LOGIN, only after STARTTLS, and
      requires a successful AUTH before MAIL. ``users`` therefore needs ``tls``.
    * Recipients in ``refuse`` (case-insensitive) get
      ``550 5.1.1 <addr>: Recipient address rejected: User unknown``.

    Usable as a context manager (``with DevSmtpServer(...) as srv:``).
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        outbox: Path,
        tls: TlsMaterial | None,
        users: Mapping[str, str] | None,
        refuse: Collection[str] = (),
        server_hostname: str = "localhost",
        ready_timeout: float = 10.0,
    ) -> None:
        """Configure the server; nothing listens until :meth:`start`.

        Args:
            host: Address to bind; use an IP literal (with ``port=0`` a name such
                as ``localhost`` may bind ::1 and 127.0.0.1 on different ports).
            port: Port to bind; 0 lets the OS pick a free one (see :attr:`port`).
            outbox: Directory receiving ``.eml`` + ``.json`` files (created if missing).
            tls: Certificate material for STARTTLS, or None for plain SMTP only.
            users: Accepted ``{login: password}``; None disables AUTH entirely.
            refuse: Recipient addresses rejected with 550 at RCPT.
            server_hostname: Name in the greeting and EHLO reply (avoids a slow
                ``socket.getfqdn()`` per connection).
            ready_timeout: Seconds to wait for the server thread to come up.

        Raises:
            ValueError: ``users`` given without ``tls`` (AUTH would never be offered).
        """
        if users is not None and tls is None:
            raise ValueError("DevSmtpServer: users (AUTH) requires tls (STARTTLS)")
        self._host = host
        self._port = port
        self.outbox = outbox
        self._tls = tls
        self._users = dict(users) if users is not None else None
        self._refuse = tuple(refuse)
        self._server_hostname = server_hostname
        self._ready_timeout = ready_timeout
        self._controller: PortController | None = None

    @property
    def host(self) -> str:
        """The address the server listens on."""
        return self._host

    @property
    def port(self) -> int:
        """The port the server listens on (the real one once started, also after stop)."""
        return self._port

    @property
    def running(self) -> bool:
        """Whether :meth:`start` has been called and :meth:`stop` not yet."""
        return self._controller is not None

    def start(self) -> None:
        """Start listening (an aiosmtpd Controller thread). Idempotent."""
        if self._controller is not None:
            return
        self.outbox.mkdir(parents=True, exist_ok=True)
        quiet_aiosmtpd_log()
        kwargs: dict[str, Any] = {
            "hostname": self._host,
            "port": self._port,
            "server_hostname": self._server_hostname,
            "ready_timeout": self._ready_timeout,
            "enable_SMTPUTF8": True,
        }
        if self._tls is not None:
            kwargs["tls_context"] = self._tls.server_context
            kwargs["require_starttls"] = True
        if self._users is not None:
            kwargs["authenticator"] = _make_authenticator(self._users)
            kwargs["auth_required"] = True
            kwargs["auth_require_tls"] = True
        else:
            kwargs["auth_exclude_mechanism"] = ["PLAIN", "LOGIN"]
        controller = PortController(_DevHandler(self.outbox, self._refuse), **kwargs)
        controller.start()
        self._port = int(controller.port)
        self._controller = controller

    def stop(self) -> None:
        """Stop listening and join the server thread. Idempotent."""
        controller, self._controller = self._controller, None
        if controller is not None:
            controller.stop()

    def __enter__(self) -> Self:
        """Start the server and return it."""
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop the server."""
        self.stop()
