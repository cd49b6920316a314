"""A fault-injecting, capturing SMTP server for tests (aiosmtpd in a background thread).

Typical use::

    with TestSmtpServer(tls=tls_material(tmp_path), users={"u": "pw"}) as srv:
        srv.add_rule(Rule("rcpt", "550 5.1.1 no such user", match="bad@example.org"))
        srv.add_rule(Rule("data", "451 4.7.1 Greylisted, retry later"))
        ...  # point the code under test at srv.host:srv.port
        assert srv.wait_for(lambda s: len(s.received) == 1)

Everything the client sends outside DATA is kept in :attr:`TestSmtpServer.commands`,
*including* AUTH lines and AUTH continuation lines (so a test can assert that a
password, or its base64, never crossed the wire in clear text).
"""

from __future__ import annotations

import asyncio
import base64
import email.policy
import hmac
import secrets
import threading
import time
import weakref
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from email.message import EmailMessage
from email.parser import BytesParser
from types import TracebackType
from typing import TYPE_CHECKING, Any, AnyStr, Literal, Self

from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

from worker.devserver import PortController, TlsMaterial, quiet_aiosmtpd_log

if TYPE_CHECKING:
    from asyncio.streams import _ReaduntilBuffer

__all__ = ["DROP", "Received", "Rule", "Stage", "TestSmtpServer"]

Stage = Literal["connect", "ehlo", "mail", "rcpt", "data_cmd", "data"]

#: A :attr:`Rule.reply` that closes the connection without replying.
DROP = "DROP"

_AUTH_MECHANISMS = frozenset({"PLAIN", "LOGIN", "CRAM-MD5", "NTLM"})


@dataclass
class Received:
    """One accepted mail (the server answered 2xx after DATA)."""

    mail_from: str
    mail_options: list[str]
    rcpt_tos: list[str]
    rcpt_options: list[list[str]]
    data: bytes
    """DATA bytes exactly as received (after dot-unstuffing, without the final ``.``)."""
    tls: bool
    auth_user: str | None
    connection_id: int

    def message(self) -> EmailMessage:
        """Parse :attr:`data` with ``email.policy.default``."""
        parsed = BytesParser(policy=email.policy.default).parsebytes(self.data)
        assert isinstance(parsed, EmailMessage)
        return parsed


@dataclass
class Rule:
    """One injected reply.

    Attributes:
        stage: Where it fires: ``connect`` (instead of the greeting), ``ehlo``
            (EHLO or HELO), ``mail``, ``rcpt``, ``data_cmd`` (the reply to the DATA
            command itself; a ``354`` there is given even without recipients, as
            some servers do, and the data that follows is read and answered with
            ``554 5.5.1 No valid recipients``) or ``data`` (the reply after the
            final ``.`` of DATA).
        reply: The full reply line, e.g. ``"451 4.7.1 Greylisted, retry later"``;
            :data:`DROP` closes the socket without replying; ``""`` means the
            normal reply (useful with ``delay_s``). A 4xx/5xx at ``connect``
            is sent as greeting and the connection is closed; a 2xx there
            replaces the greeting and the session goes on. A 4xx/5xx at
            ``data`` means the mail is *not* stored.
        times: How many times the rule fires; None means always.
        match: For ``rcpt`` only: fire only for this address (case-insensitive).
        delay_s: Seconds to wait before replying.
        fired: How many times the rule has fired so far (maintained by the server).
    """

    stage: Stage
    reply: str
    times: int | None = 1
    match: str | None = None
    delay_s: float = 0.0
    fired: int = field(default=0, compare=False)

    def _wants(self, stage: Stage, address: str | None) -> bool:
        if self.stage != stage:
            return False
        if self.times is not None and self.fired >= self.times:
            return False
        if stage == "rcpt" and self.match is not None:
            return address is not None and address.casefold() == self.match.casefold()
        return True


class _TapReader(asyncio.StreamReader):
    """A StreamReader that reports every command line the SMTP session reads.

    aiosmtpd 1.4.6 reads command lines with ``readuntil()`` (separator ``\\n``)
    and AUTH continuation lines with ``readline()`` (which calls
    ``readuntil(b"\\n")``), but DATA lines with ``readuntil(b"\\r\\n")``; only the
    former are reported.
    """

    def __init__(
        self,
        on_line: Callable[[bytes, bool], None],
        *,
        limit: int,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        super().__init__(limit=limit, loop=loop)
        self._on_line = on_line

    async def readuntil(self, separator: _ReaduntilBuffer = b"\n") -> bytes:
        line = await super().readuntil(separator)
        if separator == b"\n":
            # More bytes already waiting: the client sent this line together with the next.
            self._on_line(line, bool(self._buffer))  # type: ignore[attr-defined]
        return line


class _Envelope(Envelope):
    """An aiosmtpd Envelope that also keeps the RCPT options per recipient."""

    def __init__(self) -> None:
        super().__init__()
        self.rcpt_options_each: list[list[str]] = []


class _Connection(SMTP):
    """aiosmtpd's SMTP protocol with a wire log, fault rules and a recipient limit.

    One instance per TCP connection.
    """

    def __init__(
        self,
        handler: _Handler,
        *,
        owner: TestSmtpServer,
        warmup: bool,
        auth_required: bool,
        implicit_tls: bool,
        **kwargs: Any,
    ) -> None:
        super().__init__(handler, **kwargs)
        self._owner = owner
        self._warmup = warmup
        self._implicit_tls = implicit_tls
        self._dropped = False
        self._greeting: str | None = None
        self.connection_id = 0
        # Set after super().__init__ so that aiosmtpd never warns about
        # "auth_required without auth_require_tls" (pytest turns warnings into errors).
        self._auth_required = auth_required
        # Swap aiosmtpd's StreamReader for one that logs command lines.
        tap = _TapReader(self._on_line, limit=self.line_length_limit, loop=self.loop)
        # (asyncio.StreamReaderProtocol internals of CPython 3.11/3.12.)
        self._stream_reader_wr = weakref.ref(tap)
        self._strong_reader = tap
        assert getattr(self, "_stream_reader", None) is tap, (
            "asyncio internals changed: command log broken"
        )

    # -- state ---------------------------------------------------------------

    @property
    def tls_active(self) -> bool:
        """Whether the connection is encrypted right now."""
        return self._implicit_tls or self._tls_protocol is not None

    def _on_line(self, raw: bytes, followed: bool) -> None:
        if self._warmup:
            return
        line = raw.rstrip(b"\r\n").decode("utf-8", errors="surrogateescape")
        self._owner._log_command(self.connection_id, line, self.tls_active, followed)

    def _create_envelope(self) -> Envelope:
        return _Envelope()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        first = self.transport is None and self._original_transport is None
        if first and not self._warmup:
            self.connection_id = self._owner._register(self)
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        self._owner._unregister(self)
        super().connection_lost(error)

    def drop(self) -> None:
        """Close the socket at once; later replies are silently discarded."""
        self._dropped = True
        transport = self._original_transport or self.transport
        if isinstance(transport, asyncio.Transport):
            transport.abort()
        elif transport is not None:
            transport.close()

    async def push(self, status: AnyStr) -> None:
        if self._dropped:
            return
        if self._greeting is not None:
            greeting, self._greeting = self._greeting, None
            await super().push(greeting)
            return
        await super().push(status)

    async def _apply_rule(self, stage: Stage, address: str | None = None) -> bool:
        """Fire the first matching rule; True if it produced the reply itself."""
        rule = self._owner._take_rule(stage, address)
        if rule is None:
            return False
        if rule.delay_s > 0:
            await asyncio.sleep(rule.delay_s)
        if rule.reply == DROP:
            self.drop()
            return True
        if not rule.reply:
            return False
        await self.push(rule.reply)
        return True

    # -- SMTP commands -------------------------------------------------------

    async def _handle_client(self) -> None:
        if not self._warmup:
            rule = self._owner._take_rule("connect", None)
            if rule is not None:
                if rule.delay_s > 0:
                    await asyncio.sleep(rule.delay_s)
                if rule.reply == DROP:
                    self.drop()
                    return
                if rule.reply and not rule.reply.startswith("2"):
                    await self.push(rule.reply)
                    if self.transport is not None:
                        self.transport.close()
                    return
                if rule.reply:
                    self._greeting = rule.reply
        await super()._handle_client()

    async def smtp_EHLO(self, hostname: str) -> None:
        if await self._apply_rule("ehlo"):
            return
        await super().smtp_EHLO(hostname)

    async def smtp_HELO(self, hostname: str) -> None:
        if await self._apply_rule("ehlo"):
            return
        await super().smtp_HELO(hostname)

    async def smtp_MAIL(self, arg: str | None) -> None:
        if await self._apply_rule("mail"):
            return
        await super().smtp_MAIL(arg)

    async def smtp_RCPT(self, arg: str | None) -> None:
        address: str | None = None
        if arg is not None:
            stripped = self._strip_command_keyword("TO:", arg)
            if stripped is not None:
                address, _ = self._getaddr(stripped)
        if await self._apply_rule("rcpt", address):
            return
        limit = self._owner.max_rcpt_per_transaction
        envelope = self.envelope
        if (
            limit is not None
            and envelope is not None
            and envelope.mail_from
            and len(envelope.rcpt_tos) >= limit
        ):
            await self.push("452 4.5.3 Too many recipients")
            return
        await super().smtp_RCPT(arg)

    async def smtp_DATA(self, arg: str) -> None:
        rule = self._owner._take_rule("data_cmd", None)
        if rule is None or not rule.reply:
            await super().smtp_DATA(arg)
            return
        if rule.reply == DROP:
            self.drop()
            return
        await self.push(rule.reply)
        if rule.reply.startswith("354"):
            while self.transport is not None:
                line = await self._reader.readuntil(b"\r\n")
                if line == b".\r\n":
                    break
            await self.push("554 5.5.1 No valid recipients")


class _Handler:
    """aiosmtpd handler hooks (``handle_*``) and the CRAM-MD5 mechanism (``auth_*``).

    aiosmtpd treats every attribute named ``handle_*`` as a hook and every
    ``auth_*`` as an AUTH mechanism: do not add other attributes with those prefixes.
    """

    def __init__(self, owner: TestSmtpServer) -> None:
        self._owner = owner

    async def handle_EHLO(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        # aiosmtpd advertises a bare "AUTH" when every mechanism is excluded.
        session.host_name = hostname  # a custom EHLO hook must do this itself
        lines = [line for line in responses if line.rstrip() != "250-AUTH"]
        if self._owner.pipelining:
            lines.insert(1, "250-PIPELINING")
        return lines

    async def handle_RCPT(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        if isinstance(envelope, _Envelope):
            envelope.rcpt_options_each.append(list(rcpt_options))
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        reply = "250 2.0.0 OK"
        rule = self._owner._take_rule("data", None)
        if rule is not None:
            if rule.delay_s > 0:
                await asyncio.sleep(rule.delay_s)
            if rule.reply == DROP:
                if isinstance(server, _Connection):
                    server.drop()
                return "421 4.4.2 dropped"  # never sent: the session is dropped
            if rule.reply:
                reply = rule.reply
        if reply.startswith(("4", "5")):
            return reply
        tls = server.tls_active if isinstance(server, _Connection) else session.ssl is not None
        auth_user = session.auth_data if session.authenticated else None
        if isinstance(envelope, _Envelope):
            rcpt_options = [list(opts) for opts in envelope.rcpt_options_each]
        else:
            rcpt_options = [[] for _ in envelope.rcpt_tos]
        self._owner._store(
            Received(
                mail_from=envelope.mail_from or "",
                mail_options=list(envelope.mail_options),
                rcpt_tos=list(envelope.rcpt_tos),
                rcpt_options=rcpt_options,
                data=envelope.original_content or b"",
                tls=tls,
                auth_user=auth_user if isinstance(auth_user, str) else None,
                connection_id=server.connection_id if isinstance(server, _Connection) else 0,
            )
        )
        return reply

    async def auth_CRAM__MD5(self, server: SMTP, args: list[str]) -> AuthResult:
        """AUTH CRAM-MD5 (RFC 2195), checked against the server's users."""
        challenge = f"<{secrets.token_hex(8)}.{time.time_ns()}@{server.hostname}>"
        response = await server.challenge_auth(challenge)
        if not isinstance(response, bytes):
            return AuthResult(success=False, handled=True)  # challenge_auth replied
        login, _, digest = response.decode("utf-8", errors="replace").rpartition(" ")
        password = self._owner._users.get(login)
        if password is None:
            return AuthResult(success=False, handled=False)
        expected = hmac.new(password.encode("utf-8"), challenge.encode("ascii"), "md5")
        if hmac.compare_digest(expected.hexdigest(), digest.lower()):
            return AuthResult(success=True, auth_data=login)
        return AuthResult(success=False, handled=False)

    async def auth_NTLM(self, server: SMTP, args: list[str]) -> AuthResult:
        """AUTH NTLM, verified by pyspnego's NTLM acceptor against ``NTLM_USER_FILE``."""
        import spnego
        import spnego.exceptions

        context = spnego.server(protocol="ntlm")
        if len(args) > 1:
            negotiate: Any = base64.b64decode(args[1])
        else:
            negotiate = await server.challenge_auth("")
        if not isinstance(negotiate, bytes):
            return AuthResult(success=False, handled=True)
        try:
            challenge = context.step(negotiate)
        except spnego.exceptions.SpnegoError:
            return AuthResult(success=False, handled=False)
        response = await server.challenge_auth(challenge or b"")
        if not isinstance(response, bytes):
            return AuthResult(success=False, handled=True)
        try:
            context.step(response)
        except spnego.exceptions.SpnegoError:
            return AuthResult(success=False, handled=False)
        return AuthResult(success=True, auth_data=str(context.client_principal))


class _Controller(PortController):
    """Builds a :class:`_Connection` per connection."""

    def __init__(self, owner: TestSmtpServer, handler: _Handler, **kwargs: Any) -> None:
        self._owner = owner
        self._session_options: dict[str, Any] = {
            "auth_required": kwargs.pop("auth_required"),
            "implicit_tls": kwargs.pop("implicit_tls"),
        }
        super().__init__(handler, **kwargs)

    def factory(self) -> SMTP:
        return _Connection(
            self.handler,
            owner=self._owner,
            warmup=self._owner._warming_up,
            **self._session_options,
            **self.SMTP_kwargs,
        )


class TestSmtpServer:
    """A capturing SMTP server on 127.0.0.1 with injectable faults.

    Thread-safe: the server runs in its own thread; all public attributes and
    properties return snapshots. Usable as a context manager.
    """

    __test__ = False  # not a pytest test class

    def __init__(
        self,
        *,
        tls: TlsMaterial | None = None,
        starttls: bool = True,
        implicit_tls: bool = False,
        require_starttls: bool = False,
        users: Mapping[str, str] | None = None,
        auth_require_tls: bool = True,
        auth_required: bool | None = None,
        auth_mechanisms: Collection[str] = ("PLAIN", "LOGIN"),
        max_rcpt_per_transaction: int | None = None,
        size_limit: int | None = None,
        smtputf8: bool = True,
        pipelining: bool = False,
        host: str = "127.0.0.1",
        port: int = 0,
        server_hostname: str = "localhost",
    ) -> None:
        """Configure the server; nothing listens until :meth:`start`.

        Args:
            tls: Certificate material; with it STARTTLS is offered (unless
                ``starttls`` is False) or, with ``implicit_tls``, the whole
                connection is TLS (SMTPS, as on port 465).
            starttls: Offer STARTTLS when ``tls`` is given.
            implicit_tls: Wrap every connection in TLS from the first byte.
            require_starttls: Answer ``530`` to everything but EHLO/NOOP/QUIT/STARTTLS
                before STARTTLS.
            users: ``{login: password}``; when given, AUTH is offered.
            auth_require_tls: Offer AUTH only on an encrypted connection
                (``538`` to AUTH before STARTTLS).
            auth_required: Require AUTH before MAIL (``530 5.7.0``); defaults to
                ``users is not None``.
            auth_mechanisms: Offered mechanisms, among PLAIN, LOGIN and CRAM-MD5.
                (smtplib prefers CRAM-MD5 when it is offered.)
            max_rcpt_per_transaction: Further RCPTs get ``452 4.5.3 Too many recipients``.
            size_limit: Advertise ``SIZE n`` and enforce it (``552``); None = no limit
                and no SIZE extension.
            smtputf8: Advertise and accept SMTPUTF8.
            pipelining: Advertise PIPELINING (aiosmtpd reads pipelined commands anyway;
                :attr:`followed` shows which lines arrived together with the next).
            host: Address to bind; use an IP literal (with ``port=0`` a name such
                as ``localhost`` may bind ::1 and 127.0.0.1 on different ports).
            port: Port to bind; 0 = a free port chosen by the OS.
            server_hostname: Name used in the greeting and EHLO reply.
        """
        if implicit_tls and tls is None:
            raise ValueError("implicit_tls needs tls")
        unknown = {m.upper() for m in auth_mechanisms} - _AUTH_MECHANISMS
        if unknown:
            raise ValueError(f"unsupported AUTH mechanisms: {sorted(unknown)}")
        self._tls = tls
        self._starttls = starttls and not implicit_tls
        self._implicit_tls = implicit_tls
        self._require_starttls = require_starttls
        self._users: dict[str, str] = dict(users) if users is not None else {}
        self._auth_enabled = users is not None
        self._auth_require_tls = auth_require_tls
        self._auth_required = (users is not None) if auth_required is None else auth_required
        self._auth_mechanisms = frozenset(m.upper() for m in auth_mechanisms)
        self.max_rcpt_per_transaction = max_rcpt_per_transaction
        self._size_limit = size_limit
        self._smtputf8 = smtputf8
        self.pipelining = pipelining
        self._host = host
        self._port = port
        self._server_hostname = server_hostname

        self._lock = threading.Lock()
        self.rules: list[Rule] = []
        self._received: list[Received] = []
        self._commands: list[tuple[int, str, bool]] = []
        self._followed: list[str] = []
        self._connections = 0
        self._transactions = 0
        self._next_connection_id = 0
        self._live: set[_Connection] = set()
        self._warming_up = False
        self._controller: _Controller | None = None

    # -- lifecycle -----------------------------------------------------------

    @property
    def host(self) -> str:
        """The address the server listens on."""
        return self._host

    @property
    def port(self) -> int:
        """The port the server listens on (the real one once started)."""
        return self._port

    def start(self) -> None:
        """Start listening in a background thread. Idempotent."""
        if self._controller is not None:
            return
        quiet_aiosmtpd_log()
        kwargs: dict[str, Any] = {
            "hostname": self._host,
            "port": self._port,
            "server_hostname": self._server_hostname,
            "ready_timeout": 10.0,
            "enable_SMTPUTF8": self._smtputf8,
            "data_size_limit": self._size_limit,
            "auth_required": self._auth_required,
            "implicit_tls": self._implicit_tls,
            # With implicit TLS aiosmtpd does not know the link is encrypted.
            "auth_require_tls": self._auth_require_tls and not self._implicit_tls,
            "authenticator": self._authenticate,
        }
        if self._tls is not None and self._implicit_tls:
            kwargs["ssl_context"] = self._tls.server_context
        elif self._tls is not None and self._starttls:
            kwargs["tls_context"] = self._tls.server_context
            kwargs["require_starttls"] = self._require_starttls
        excluded = set(_AUTH_MECHANISMS)
        if self._auth_enabled:
            excluded -= self._auth_mechanisms
        kwargs["auth_exclude_mechanism"] = sorted(excluded)
        controller = _Controller(self, _Handler(self), **kwargs)
        self._warming_up = True
        try:
            controller.start()
        finally:
            self._warming_up = False
        self._port = int(controller.port)
        self._controller = controller

    def stop(self) -> None:
        """Close every open connection, stop listening and join the thread. Idempotent."""
        controller, self._controller = self._controller, None
        if controller is None:
            return

        def drop_all() -> None:
            with self._lock:
                live = list(self._live)
            for session in live:
                session.drop()

        controller.loop.call_soon_threadsafe(drop_all)
        controller.stop()

    def drop_connections(self) -> None:
        """Abort every open client connection (clients must reconnect), keep listening."""
        controller = self._controller
        if controller is None:
            return
        done = threading.Event()

        def drop_all() -> None:
            with self._lock:
                live = list(self._live)
            for session in live:
                session.drop()
            done.set()

        controller.loop.call_soon_threadsafe(drop_all)
        done.wait(5)

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

    # -- rules ---------------------------------------------------------------

    def add_rule(self, rule: Rule) -> Rule:
        """Append ``rule`` (rules fire in list order) and return it."""
        with self._lock:
            self.rules.append(rule)
        return rule

    def reset(self) -> None:
        """Forget received mails, rules, the command log and the counters.

        Connection ids keep increasing (they stay unique for the server's life).
        """
        with self._lock:
            self.rules.clear()
            self._received.clear()
            self._commands.clear()
            self._followed.clear()
            self._connections = 0
            self._transactions = 0

    # -- observations --------------------------------------------------------

    @property
    def received(self) -> list[Received]:
        """Accepted mails, oldest first (a snapshot)."""
        with self._lock:
            return list(self._received)

    @property
    def commands(self) -> list[tuple[int, str, bool]]:
        """The wire log: ``(connection_id, line as received, tls_active)``.

        Every line the client sent outside DATA, in order, including unknown
        commands, commands refused before STARTTLS and AUTH continuation lines.
        """
        with self._lock:
            return list(self._commands)

    @property
    def followed(self) -> list[str]:
        """Command lines that arrived with more bytes behind them (pipelined), in order."""
        with self._lock:
            return list(self._followed)

    @property
    def connections(self) -> int:
        """TCP connections accepted so far."""
        with self._lock:
            return self._connections

    @property
    def transactions(self) -> int:
        """``MAIL`` commands seen so far (whatever the reply)."""
        with self._lock:
            return self._transactions

    @property
    def open_connections(self) -> int:
        """Connections currently open."""
        with self._lock:
            return len(self._live)

    def accepted_count(self, addr: str) -> int:
        """How many accepted mails included ``addr`` (case-insensitive) as a recipient."""
        wanted = addr.casefold()
        with self._lock:
            return sum(
                1 for mail in self._received if any(r.casefold() == wanted for r in mail.rcpt_tos)
            )

    def wait_for(self, predicate: Callable[[TestSmtpServer], bool], timeout_s: float = 10) -> bool:
        """Poll ``predicate(self)`` until it is true or ``timeout_s`` passed; return it."""
        deadline = time.monotonic() + timeout_s
        while True:
            if predicate(self):
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.01)

    # -- called from the server thread ---------------------------------------

    def _register(self, session: _Connection) -> int:
        with self._lock:
            self._connections += 1
            self._next_connection_id += 1
            self._live.add(session)
            return self._next_connection_id

    def _unregister(self, session: _Connection) -> None:
        with self._lock:
            self._live.discard(session)

    def _log_command(self, connection_id: int, line: str, tls: bool, followed: bool) -> None:
        with self._lock:
            self._commands.append((connection_id, line, tls))
            if followed:
                self._followed.append(line)
            if line[:5].upper() == "MAIL ":
                self._transactions += 1

    def _take_rule(self, stage: Stage, address: str | None) -> Rule | None:
        with self._lock:
            for rule in self.rules:
                if rule._wants(stage, address):
                    rule.fired += 1
                    return rule
        return None

    def _store(self, mail: Received) -> None:
        with self._lock:
            self._received.append(mail)

    def _authenticate(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, auth_data: Any
    ) -> AuthResult:
        if not isinstance(auth_data, LoginPassword):
            return AuthResult(success=False, handled=False)
        login = auth_data.login.decode("utf-8", errors="replace")
        password = auth_data.password.decode("utf-8", errors="replace")
        if self._users.get(login) == password:
            return AuthResult(success=True, auth_data=login)
        return AuthResult(success=False, handled=False)
