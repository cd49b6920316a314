"""The SMTP connection: TLS, AUTH, per-recipient replies, and the one place where smtplib's and
ssl's exceptions become MailSender's ``TransientError`` / ``PermanentError``.
"""

from __future__ import annotations

import base64
import ipaddress
import logging
import re
import smtplib
import socket
import ssl
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import TypeVar

from worker.classify import (
    Reply,
    format_reply,
    is_accepted,
    is_too_many_recipients,
    is_transient_reply,
)
from worker.config import InstanceConfig
from worker.errors import DeliveryError, PermanentError, TransientError
from worker.message import BuiltMessage

log = logging.getLogger(__name__)

T = TypeVar("T")

LOCAL_HOSTNAME = socket.gethostname() or "localhost"
"""EHLO name; ``socket.getfqdn()`` (smtplib's default) can stall on DNS."""


_DOT_AT_LINE_START = re.compile(rb"(?m)^\.")
"""Dot-stuffing (RFC 5321 §4.5.2), as smtplib does it."""


def _write_data(smtp: smtplib.SMTP, data: bytes) -> tuple[int, bytes]:
    """Send the message after the server's 354, dot-stuffed, and return the reply to its end.

    Unlike ``smtplib.SMTP.data`` this makes no copy of the message unless a line starts with a
    dot (which a base64 attachment never does): a large attachment is not doubled in memory.
    """
    stuffed = _DOT_AT_LINE_START.sub(b"..", data)  # the same object when nothing matched
    smtp.send(stuffed)
    smtp.send(b".\r\n" if stuffed.endswith(b"\r\n") else b"\r\n.\r\n")
    return smtp.getreply()


class Step:
    """Where a transaction is, for error messages: read when an error is mapped, so that a
    failure is named by the step it happened in (MAIL FROM, RCPT TO, DATA, end of DATA)."""

    def __init__(self, name: str) -> None:
        self.name = name


AFTER_DATA_NOTE = "the server may have the mail already; a retry may deliver it twice"


class StaleSession(TransientError):
    """A reused session was closed by the server before MAIL FROM: safe to reopen at once."""


@dataclass
class SendOutcome:
    """What one SMTP session did with one message, per recipient."""

    accepted: list[str] = field(default_factory=list)
    refused: dict[str, str] = field(default_factory=dict)  # permanent: addr -> "550 5.1.1 ..."
    deferred: dict[str, str] = field(default_factory=dict)  # transient: addr -> "451 ..."


@dataclass(frozen=True)
class ServerInfo:
    """What a server offered, for ``mailsender check``."""

    banner: str
    tls: bool
    auth_mechanisms: list[str]
    size_limit: int | None
    smtputf8: bool
    authenticated_as: str | None


def tls_context(instance: InstanceConfig) -> ssl.SSLContext:
    """A verifying client context: system CAs, or only ``caFile`` when it is set."""
    cafile = str(instance.ca_file) if instance.ca_file else None
    context = ssl.create_default_context(cafile=cafile)
    context.check_hostname = True
    context.verify_mode = ssl.CERT_REQUIRED
    return context


def _is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


class SmtpConnection:
    """One SMTP session with an instance's server, opened on demand and reusable.

    ``open()`` connects, says EHLO, upgrades with STARTTLS when ``useSsl`` (mandatory, verified)
    and authenticates when a user name is configured (or NTLM with the service identity).
    """

    def __init__(self, name: str, instance: InstanceConfig) -> None:
        self.name = name
        self.instance = instance
        self._smtp: smtplib.SMTP | None = None
        self.messages_sent = 0
        self.last_used = 0.0
        self.tls_active = False
        self.authenticated_as: str | None = None

    @property
    def where(self) -> str:
        """``host:port`` for messages."""
        return f"{self.instance.mail_server}:{self.instance.port}"

    @property
    def is_open(self) -> bool:
        """Whether a session is established."""
        return self._smtp is not None

    # -- opening ---------------------------------------------------------------------------

    def open(self) -> None:
        """Connect, EHLO, STARTTLS and AUTH as configured. Raises ``DeliveryError``."""
        self.close()
        inst = self.instance
        mode = inst.tls_mode
        with self._mapped("connect"):
            try:
                smtp = self._connect(mode)
            except smtplib.SMTPConnectError as exc:
                raise self._reply_error("connect", exc.smtp_code, exc.smtp_error) from None
            self._smtp = smtp
            # Commands and replies are whole writes; never hold one back waiting for an ACK.
            if smtp.sock is not None:
                with suppress(OSError):
                    smtp.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.tls_active = mode == "implicit"
            self._ehlo(smtp)
            if mode == "starttls":
                if not smtp.has_extn("starttls"):
                    raise PermanentError(
                        f"STARTTLS is required (useSsl) but the server {self.where} does not "
                        "offer it; nothing was sent"
                    )
                smtp.starttls(context=tls_context(inst))
                self.tls_active = True
                self._ehlo(smtp)
            self._authenticate(smtp)
        self.messages_sent = 0
        self.last_used = time.monotonic()

    def _connect(self, mode: str) -> smtplib.SMTP:
        inst = self.instance
        if mode != "implicit":
            try:
                return smtplib.SMTP(
                    inst.mail_server,
                    inst.port,
                    local_hostname=LOCAL_HOSTNAME,
                    timeout=inst.timeout_s,
                )
            except (TimeoutError, smtplib.SMTPServerDisconnected) as exc:
                if "timed out" not in str(exc) and not isinstance(exc, TimeoutError):
                    raise
                raise TransientError(
                    f"connect at {self.where}: timed out after {inst.timeout_s:g} s without an "
                    "SMTP greeting (if this port expects TLS from the first byte, "
                    "set tls: implicit)"
                ) from None
        try:
            return smtplib.SMTP_SSL(
                inst.mail_server,
                inst.port,
                local_hostname=LOCAL_HOSTNAME,
                timeout=inst.timeout_s,
                context=tls_context(inst),
            )
        except ssl.SSLError as exc:
            if exc.reason == "WRONG_VERSION_NUMBER":
                raise PermanentError(
                    f"implicit TLS with {self.where} failed: the server answered in plain text; "
                    "for a STARTTLS port (usually 587 or 25) set tls: starttls"
                ) from None
            raise

    def _ehlo(self, smtp: smtplib.SMTP) -> None:
        code, text = smtp.ehlo()
        if not is_accepted(code):
            code, text = smtp.helo()
            if not is_accepted(code):
                raise self._reply_error("EHLO", code, text)

    def _authenticate(self, smtp: smtplib.SMTP) -> None:
        inst = self.instance
        user = inst.user_name
        password = inst.password.get_secret_value()
        if not user and not inst.use_default_credentials:
            return
        if not self.tls_active:
            peer = smtp.sock.getpeername()[0] if smtp.sock else ""
            if not _is_loopback(peer):
                raise PermanentError(
                    f"refusing to send credentials of instance {self.name!r} unencrypted to "
                    f"{self.where}; set useSsl: true"
                )
        mechanisms = (smtp.esmtp_features.get("auth") or "").upper().split()
        if inst.use_default_credentials or (user and mechanisms == ["NTLM"]):
            self._auth_ntlm(smtp, user or None, password or None)
            self.authenticated_as = user or "(service identity)"
            return
        if not mechanisms:
            raise PermanentError(
                f"userName is set but the server {self.where} offers no AUTH"
                + ("" if self.tls_active else " (before TLS)")
            )
        try:
            smtp.login(user, password)
        except smtplib.SMTPAuthenticationError as exc:
            raise self._reply_error(f"AUTH as {user!r}", exc.smtp_code, exc.smtp_error) from None
        except smtplib.SMTPException as exc:
            if "No suitable authentication method" in str(exc):
                raise PermanentError(
                    f"the server {self.where} offers AUTH {' '.join(mechanisms)}, none of which "
                    "MailSender supports with a user name and password"
                ) from None
            raise
        self.authenticated_as = user

    def _auth_ntlm(self, smtp: smtplib.SMTP, user: str | None, password: str | None) -> None:
        """AUTH NTLM with pyspnego: the given user, or the worker's own identity."""
        import spnego

        try:
            context = spnego.client(
                username=user,
                password=password,
                hostname=self.instance.mail_server,
                service="SMTP",
                protocol="ntlm",
            )
            token = context.step()
        except Exception as exc:
            raise PermanentError(f"NTLM credentials are not available: {exc}") from None
        code, text = smtp.docmd("AUTH", "NTLM " + base64.b64encode(token or b"").decode())
        if code != 334:
            raise self._reply_error("AUTH NTLM", code, text)
        try:
            token = context.step(base64.b64decode(text))
        except Exception as exc:
            raise PermanentError(f"the server's NTLM challenge was not valid: {exc}") from None
        code, text = smtp.docmd(base64.b64encode(token or b"").decode())
        if code != 235:
            raise self._reply_error("AUTH NTLM", code, text)

    # -- sending ---------------------------------------------------------------------------

    def server_info(self) -> ServerInfo:
        """What the open session's server offers."""
        smtp = self._require()
        size = smtp.esmtp_features.get("size", "")
        return ServerInfo(
            banner=format_reply(0, smtp.ehlo_resp or b"").split(" ")[0],
            tls=self.tls_active,
            auth_mechanisms=(smtp.esmtp_features.get("auth") or "").split(),
            size_limit=int(size) if size.isdigit() and int(size) > 0 else None,
            smtputf8=smtp.has_extn("smtputf8"),
            authenticated_as=self.authenticated_as,
        )

    def send(self, message: BuiltMessage, recipients: list[str]) -> SendOutcome:
        """Send ``message`` to ``recipients`` in as many transactions as the server needs.

        Returns per-recipient outcomes. Raises ``DeliveryError`` when the whole transaction
        failed (MAIL refused, DATA refused, connection lost before the server's 250).
        """
        smtp = self._require()
        info = self.server_info()
        if info.size_limit is not None and len(message.data) > info.size_limit:
            raise PermanentError(
                f"the message is {len(message.data)} bytes but the server {self.where} "
                f"accepts at most {info.size_limit} (SIZE); nothing was sent"
            )
        options: list[str] = []
        if info.size_limit is not None or smtp.has_extn("size"):
            options.append(f"SIZE={len(message.data)}")
        if message.needs_smtputf8:
            if not info.smtputf8:
                wide = [a for a in [message.sender, *recipients] if not a.isascii()] or [
                    "an address in the headers"
                ]
                raise PermanentError(
                    f"{', '.join(wide)}: not ASCII, but the server {self.where} does not offer "
                    "SMTPUTF8 (RFC 6531); nothing was sent"
                )
            options.append("SMTPUTF8")
            if smtp.has_extn("8bitmime"):
                options.append("BODY=8BITMIME")

        outcome = SendOutcome()
        pending = list(recipients)
        while pending:
            batch_outcome, rest = self._transaction(smtp, message, pending, options)
            outcome.accepted += batch_outcome.accepted
            outcome.refused.update(batch_outcome.refused)
            outcome.deferred.update(batch_outcome.deferred)
            if not rest or not batch_outcome.accepted:
                outcome.deferred.update(rest)
                break
            pending = list(rest)  # 452 too many recipients: the rest in the next transaction
        self.messages_sent += 1
        self.last_used = time.monotonic()
        return outcome

    def _transaction(
        self,
        smtp: smtplib.SMTP,
        message: BuiltMessage,
        recipients: list[str],
        options: list[str],
    ) -> tuple[SendOutcome, dict[str, str]]:
        """One MAIL/RCPT…/DATA transaction; returns the outcome and the too-many-recipients rest."""
        if smtp.has_extn("pipelining"):
            return self._pipelined(smtp, message, recipients, options)
        outcome = SendOutcome()
        too_many: dict[str, str] = {}
        step = Step("MAIL FROM")
        with self._mapped(step):
            try:
                code, text = smtp.mail(message.sender, options)
            except (smtplib.SMTPServerDisconnected, ConnectionError):
                if self.messages_sent:
                    raise StaleSession(f"reused session with {self.where} was closed") from None
                raise
            if code == Reply.SERVICE_UNAVAILABLE and self.messages_sent:
                raise StaleSession(f"reused session with {self.where} ended: {code}")
            if not is_accepted(code):
                self._rset(smtp)
                raise self._reply_error(f"MAIL FROM <{message.sender}>", code, text)
            for address in recipients:
                if too_many:
                    too_many[address] = next(iter(too_many.values()))
                    continue
                step.name = f"RCPT TO <{address}>"
                code, text = smtp.rcpt(address)
                reply = format_reply(code, text)
                if is_accepted(code):
                    outcome.accepted.append(address)
                elif is_too_many_recipients(code, reply):
                    too_many[address] = reply
                elif is_transient_reply(code, stage="rcpt"):
                    outcome.deferred[address] = reply
                else:
                    outcome.refused[address] = reply
            if not outcome.accepted:
                self._rset(smtp)
                return outcome, too_many
            step.name = "DATA"
            code, text = smtp.docmd("data")
            if code != Reply.START_INPUT:
                self._rset(smtp)
                raise self._reply_error("DATA", code, text)
            step.name = f"end of DATA for {', '.join(outcome.accepted)}"
            code, text = _write_data(smtp, message.data)
            if not is_accepted(code):
                self._rset(smtp)
                raise self._reply_error(step.name, code, text)
        return outcome, too_many

    def _pipelined(
        self,
        smtp: smtplib.SMTP,
        message: BuiltMessage,
        recipients: list[str],
        options: list[str],
    ) -> tuple[SendOutcome, dict[str, str]]:
        """The same transaction with PIPELINING (RFC 2920): MAIL, every RCPT and DATA go out in
        one write and their replies are read in order, so a mail costs two round trips instead
        of three plus one per recipient. Every reply is checked, as the RFC asks."""
        outcome = SendOutcome()
        too_many: dict[str, str] = {}
        if "SMTPUTF8" in options:
            smtp.command_encoding = "utf-8"
        args = "".join(f" {o}" for o in options)
        lines = [f"MAIL FROM:{smtplib.quoteaddr(message.sender)}{args}"]
        lines += [f"RCPT TO:{smtplib.quoteaddr(a)}" for a in recipients]
        lines.append("DATA")
        if any("\r" in line or "\n" in line for line in lines):
            raise PermanentError("an envelope address contains a line break; nothing was sent")
        step = Step("MAIL FROM")
        with self._mapped(step):
            try:
                smtp.send("".join(f"{line}\r\n" for line in lines))
                code, text = smtp.getreply()
            except (smtplib.SMTPServerDisconnected, ConnectionError):
                if self.messages_sent:
                    raise StaleSession(f"reused session with {self.where} was closed") from None
                raise
            if code == Reply.SERVICE_UNAVAILABLE:
                if self.messages_sent:
                    raise StaleSession(f"reused session with {self.where} ended: {code}")
                raise self._reply_error(f"MAIL FROM <{message.sender}>", code, text)
            mail_refused = None if is_accepted(code) else (code, text)
            for address in recipients:
                step.name = f"RCPT TO <{address}>"
                code, text = smtp.getreply()
                reply = format_reply(code, text)
                if mail_refused is not None:
                    continue  # 503 "need MAIL": the MAIL reply is the one that counts
                if is_accepted(code):
                    outcome.accepted.append(address)
                elif too_many or is_too_many_recipients(code, reply):
                    too_many[address] = reply
                elif is_transient_reply(code, stage="rcpt"):
                    outcome.deferred[address] = reply
                else:
                    outcome.refused[address] = reply
            step.name = "DATA"
            data_code, data_text = smtp.getreply()
            if data_code == Reply.START_INPUT and (mail_refused or not outcome.accepted):
                # The server took DATA though nobody can receive it: end it empty (RFC 2920).
                smtp.send(".\r\n")
                smtp.getreply()
            if mail_refused is not None:
                self._rset(smtp)
                raise self._reply_error(f"MAIL FROM <{message.sender}>", *mail_refused)
            if not outcome.accepted:
                self._rset(smtp)
                return outcome, too_many
            if data_code != Reply.START_INPUT:
                self._rset(smtp)
                raise self._reply_error("DATA", data_code, data_text)
        step = Step(f"end of DATA for {', '.join(outcome.accepted)}")
        with self._mapped(step):
            code, text = _write_data(smtp, message.data)
            if not is_accepted(code):
                self._rset(smtp)
                raise self._reply_error(step.name, code, text)
        return outcome, too_many

    def _rset(self, smtp: smtplib.SMTP) -> None:
        try:
            smtp.rset()
        except (smtplib.SMTPException, OSError):
            self.close()

    def noop_ok(self) -> bool:
        """Whether the session still answers (NOOP)."""
        if self._smtp is None:
            return False
        try:
            return is_accepted(self._smtp.noop()[0])
        except (smtplib.SMTPException, OSError):
            return False

    def close(self) -> None:
        """QUIT and close; never raises."""
        smtp, self._smtp = self._smtp, None
        self.tls_active = False
        self.authenticated_as = None
        if smtp is None:
            return
        try:
            smtp.quit()
        except (smtplib.SMTPException, OSError):
            smtp.close()

    # -- the error boundary ------------------------------------------------------------------

    def _require(self) -> smtplib.SMTP:
        if self._smtp is None:
            raise TransientError(f"no open SMTP session with {self.where}")
        return self._smtp

    def _reply_error(self, stage: str, code: int, text: bytes | str) -> DeliveryError:
        reply = format_reply(code, text)
        message = f"{stage} at {self.where}: {reply}"
        if is_transient_reply(code, stage=stage.lower()):
            return TransientError(message, code)
        return PermanentError(message, code)

    @contextmanager
    def _mapped(self, at: str | Step) -> Iterator[None]:
        """Map smtplib/ssl/socket exceptions raised inside to MailSender's errors, named by the
        step (``at``) they happened in."""
        step = at if isinstance(at, Step) else Step(at)
        try:
            yield
        except DeliveryError:
            self.close()
            raise
        except smtplib.SMTPServerDisconnected as exc:
            self.close()
            stage = step.name
            after_data = f"; {AFTER_DATA_NOTE}" if stage.startswith("end of DATA") else ""
            if isinstance(exc.__context__, TimeoutError):  # smtplib words a time-out as a close
                raise TransientError(
                    f"{stage} at {self.where}: no reply within {self.instance.timeout_s:g} s"
                    f" (timeoutS){after_data}"
                ) from None
            raise TransientError(
                f"{stage} at {self.where}: the server closed the connection "
                f"({exc or 'no reply'}){after_data}"
            ) from None
        except smtplib.SMTPNotSupportedError as exc:
            self.close()
            raise PermanentError(f"{step.name} at {self.where}: {exc}") from None
        except smtplib.SMTPResponseException as exc:
            self.close()
            raise self._reply_error(step.name, exc.smtp_code, exc.smtp_error) from None
        except smtplib.SMTPException as exc:
            self.close()
            raise PermanentError(f"{step.name} at {self.where}: {exc}") from None
        except ssl.SSLCertVerificationError as exc:
            self.close()
            raise PermanentError(
                f"TLS with {self.where}: certificate verification failed "
                f"({exc.verify_message or exc.reason}); set caFile to trust a private CA"
            ) from None
        except ssl.SSLError as exc:
            self.close()
            raise PermanentError(
                f"TLS with {self.where} failed ({exc.reason or exc}); "
                "is the port right for STARTTLS?"
            ) from None
        except socket.gaierror as exc:
            self.close()
            raise TransientError(
                f"cannot resolve mail server {self.instance.mail_server!r}: {exc.strerror}"
            ) from None
        except TimeoutError:
            self.close()
            raise TransientError(
                f"{step.name} at {self.where}: timed out after {self.instance.timeout_s:g} s"
            ) from None
        except ConnectionRefusedError:
            self.close()
            raise TransientError(f"{step.name} at {self.where}: connection refused") from None
        except OSError as exc:
            self.close()
            raise TransientError(
                f"{step.name} at {self.where}: connection failed ({exc.strerror or exc})"
            ) from None


def with_connection(connection: SmtpConnection, action: Callable[[SmtpConnection], T]) -> T:
    """Run ``action`` on ``connection``; a reused session that turned stale is reopened once."""
    if not connection.is_open:
        connection.open()
        return action(connection)
    try:
        return action(connection)
    except StaleSession:
        log.debug("reused SMTP session with %s went stale; reconnecting", connection.where)
        connection.open()
        return action(connection)
