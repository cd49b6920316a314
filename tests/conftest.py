"""Fixtures on real parts: a private redis-server, aiosmtpd servers, a real worker process."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis

from producer import MailProducer
from tests.support.fleet import EventsReader, RedisServer, WorkerProcess, free_port
from tests.support.smtp import TestSmtpServer
from tests.support.tls import misnamed_tls_material, tls_material, untrusted_tls_material
from worker.devserver import TlsMaterial

PASSWORD = "S3cret-Test!"
USER = "mailer"

FAST_RETRIES = {"retryDelayS": 0.3, "retryDelayMaxS": 1.0, "maxRetries": 3, "timeoutS": 10}


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A private redis-server for the whole run."""
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def trusted_tls(tmp_path_factory: pytest.TempPathFactory) -> TlsMaterial:
    """A CA the worker is told to trust (caFile) and a server certificate from it."""
    return tls_material(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="session")
def untrusted_tls(tmp_path_factory: pytest.TempPathFactory) -> TlsMaterial:
    """A certificate from a CA the worker does not know."""
    return untrusted_tls_material(tmp_path_factory.mktemp("tls-untrusted"))


@pytest.fixture(scope="session")
def misnamed_tls(tmp_path_factory: pytest.TempPathFactory) -> TlsMaterial:
    """A trusted CA of its own whose server certificate names only ``mail.example.test``."""
    return misnamed_tls_material(tmp_path_factory.mktemp("tls-misnamed"))


@dataclass
class Servers:
    """Every SMTP server of the session, by role."""

    plain: TestSmtpServer  # no TLS, no AUTH: the cases' baseline
    secure: TestSmtpServer  # STARTTLS (trusted CA) + AUTH required
    no_starttls: TestSmtpServer  # AUTH offered in clear text, no STARTTLS
    untrusted: TestSmtpServer  # STARTTLS with an unknown CA, AUTH
    self_signed: TestSmtpServer  # STARTTLS with an unknown CA, no AUTH (useSsl false)
    limited: TestSmtpServer  # at most 2 RCPT per transaction
    sized: TestSmtpServer  # SIZE 1 MiB
    implicit: TestSmtpServer  # TLS from the first byte (port 465 style), AUTH
    misnamed: TestSmtpServer  # STARTTLS + AUTH, certificate for mail.example.test only

    def all(self) -> list[TestSmtpServer]:
        return list(vars(self).values())


@pytest.fixture(scope="session")
def servers(
    trusted_tls: TlsMaterial, untrusted_tls: TlsMaterial, misnamed_tls: TlsMaterial
) -> Iterator[Servers]:
    """Start every SMTP server once."""
    users = {USER: PASSWORD}
    s = Servers(
        plain=TestSmtpServer(),
        secure=TestSmtpServer(tls=trusted_tls, users=users, require_starttls=True),
        no_starttls=TestSmtpServer(users=users, auth_require_tls=False),
        untrusted=TestSmtpServer(tls=untrusted_tls, users=users),
        self_signed=TestSmtpServer(tls=untrusted_tls),
        limited=TestSmtpServer(max_rcpt_per_transaction=2),
        sized=TestSmtpServer(size_limit=1024 * 1024),
        implicit=TestSmtpServer(tls=trusted_tls, implicit_tls=True, users=users),
        misnamed=TestSmtpServer(tls=misnamed_tls, users=users, require_starttls=True),
    )
    for server in s.all():
        server.start()
    yield s
    for server in s.all():
        server.stop()


def instance(server: TestSmtpServer, **params: Any) -> dict[str, Any]:
    """The baseline instance of the cases for ``server``, with ``params`` on top."""
    return {
        "mailServer": "127.0.0.1",
        "port": server.port,
        "sender": "noreply@example.com",
        **FAST_RETRIES,
        **params,
    }


@pytest.fixture(scope="session")
def attachment_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The worker's MAILSENDER_ATTACHMENT_ROOT."""
    return tmp_path_factory.mktemp("attachments")


@pytest.fixture(scope="session")
def fleet_config(
    redis_server: RedisServer,
    servers: Servers,
    trusted_tls: TlsMaterial,
    misnamed_tls: TlsMaterial,
) -> dict[str, Any]:
    """The YAML configuration of the session's worker (as a dict)."""
    secure = {
        "useSsl": True,
        "caFile": str(trusted_tls.ca_pem_path),
        "userName": USER,
        "password": "${TEST_SMTP_PASSWORD}",
    }
    return {
        "broker_url": redis_server.url(0),
        "result_backend": redis_server.url(1),
        "visibility_timeout_s": 3600,
        "instances": {
            "Plain": instance(servers.plain),
            "Alerts": instance(
                servers.plain,
                sender="Alerts <alerts@example.com>",
                recipients="Ops <ops@example.com>, oncall@example.com",
                subjectPrefix="Test - ",
                endpoint="ops-mail",
                interface="Monitoring",
            ),
            "Secure": instance(servers.secure, mailServer="localhost", **secure),
            "NoStarttls": instance(servers.no_starttls, **secure),
            "Untrusted": instance(servers.untrusted, mailServer="localhost", **secure),
            "SelfSignedOff": instance(servers.self_signed, useSsl=False),
            "SelfSignedOffString": instance(servers.self_signed, useSsl="False"),
            "Limited": instance(servers.limited),
            "Sized": instance(servers.sized),
            "Down": instance(servers.plain, port=free_port(), maxRetries=1),
            "Implicit": instance(
                servers.implicit,
                mailServer="localhost",
                tls="implicit",
                **{k: v for k, v in secure.items() if k != "useSsl"},
            ),
            "ImplicitOnStarttlsPort": instance(
                servers.secure,
                mailServer="localhost",
                tls="implicit",
                **{k: v for k, v in secure.items() if k != "useSsl"},
            ),
            "StarttlsOnImplicitPort": instance(
                servers.implicit, mailServer="localhost", timeoutS=1, maxRetries=0, **secure
            ),
            # An empty userName means no AUTH, whatever the password says (test_parameters).
            "PlainEmptyUser": instance(servers.plain, userName="", password="not-used"),
            # The right server and TLS, the wrong password: AUTH is rejected (test_parameters).
            "WrongPassword": instance(
                servers.secure,
                mailServer="localhost",
                useSsl=True,
                caFile=str(trusted_tls.ca_pem_path),
                userName=USER,
                password="wrong-password",
            ),
            # The session's password offered for a user the server does not know: 535
            # (test_security searches every Redis key for the password afterwards).
            "WrongUser": instance(servers.secure, mailServer="localhost", **secure)
            | {"userName": "intruder"},
            # A CA the worker trusts, but a certificate for another name than the one the
            # instance connects by (127.0.0.1): the host name check must refuse it.
            "Misnamed": instance(
                servers.misnamed, **secure | {"caFile": str(misnamed_tls.ca_pem_path)}
            ),
        },
    }


@pytest.fixture(scope="session")
def fleet_worker(
    tmp_path_factory: pytest.TempPathFactory, fleet_config: dict[str, Any], attachment_root: Path
) -> Iterator[WorkerProcess]:
    """One real worker process (threads pool, 4 threads) for the session."""
    worker = WorkerProcess(
        tmp_path_factory.mktemp("worker"),
        fleet_config,
        env={"TEST_SMTP_PASSWORD": PASSWORD, "MAILSENDER_ATTACHMENT_ROOT": str(attachment_root)},
    )
    worker.start()
    yield worker
    worker.stop()


@pytest.fixture
def producer(redis_server: RedisServer) -> Iterator[MailProducer]:
    """A producer on the session's Redis."""
    p = MailProducer(redis_server.url(0), redis_server.url(1))
    yield p
    p.close()


@pytest.fixture
def backend(redis_server: RedisServer) -> redis.Redis:
    """A client of the result backend's Redis (stream, dead letters)."""
    return redis.Redis.from_url(redis_server.url(1), decode_responses=True)


@pytest.fixture
def events(redis_server: RedisServer) -> EventsReader:
    """Reads instance events from the events queue."""
    return EventsReader(redis_server.url(0))


@pytest.fixture
def fleet(fleet_worker: WorkerProcess, servers: Servers) -> Iterator[Servers]:
    """The running worker and fresh SMTP servers (no rules, nothing received, no sessions)."""
    for server in servers.all():
        server.reset()
        server.drop_connections()
    yield servers
    for server in servers.all():
        server.reset()
