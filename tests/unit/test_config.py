"""Table-driven tests of ``worker.config``: instances from YAML (contract §1).

``parse_config`` is pure (loaded YAML + an environment mapping), so every case passes its own
environment; ``load_config`` is tested on files in ``tmp_path``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from producer import names
from worker.config import (
    ENV_ATTACHMENT_ROOT,
    ENV_CONFIG,
    Config,
    InstanceConfig,
    load_config,
    parse_config,
)
from worker.errors import ConfigError

BASE: dict[str, Any] = {"mailServer": "smtp.example.com", "sender": "alerts@example.com"}
THIS_FILE = str(Path(__file__).resolve())


def one_instance(params: dict[str, Any], env: dict[str, str] | None = None) -> InstanceConfig:
    """Parse a configuration with the single instance ``Alerts``."""
    config = parse_config({"instances": {"Alerts": params}}, env or {})
    return config.instances["Alerts"]


def problems(raw: Any, env: dict[str, str] | None = None) -> list[str]:
    """The problems ``parse_config`` reports for ``raw``."""
    with pytest.raises(ConfigError) as info:
        parse_config(raw, env or {})
    return info.value.problems


def _plain(value: Any) -> Any:
    """Secrets and paths compared as plain values."""
    if hasattr(value, "get_secret_value"):
        return value.get_secret_value()
    if isinstance(value, Path):
        return str(value)
    return value


# --- every parameter, both spellings ------------------------------------------------------


PARAMETERS = [
    # camelCase, snake_case, YAML value, attribute, expected value
    ("mailServer", "mail_server", "mail.example.org", "mail_server", "mail.example.org"),
    ("mailServer", "mail_server", "192.0.2.10", "mail_server", "192.0.2.10"),
    ("port", "port", 587, "port", 587),
    ("useSsl", "use_ssl", True, "use_ssl", True),
    ("useDefaultCredentials", "use_default_credentials", True, "use_default_credentials", True),
    ("userName", "user_name", "alerts", "user_name", "alerts"),
    ("password", "password", "s3cret", "password", "s3cret"),
    (
        "recipients",
        "recipients",
        "ops@example.com, Oncall <oncall@example.com>",
        "recipients",
        "ops@example.com, Oncall <oncall@example.com>",
    ),
    ("sender", "sender", "Alerts <alerts@example.com>", "sender", "Alerts <alerts@example.com>"),
    ("subjectPrefix", "subject_prefix", "Test - ", "subject_prefix", "Test - "),
    ("endpoint", "endpoint", "ops-mail", "endpoint", "ops-mail"),
    ("interface", "interface", "Monitoring", "interface", "Monitoring"),
    ("caFile", "ca_file", THIS_FILE, "ca_file", THIS_FILE),
    ("maxRetries", "max_retries", 3, "max_retries", 3),
    ("retryDelayS", "retry_delay_s", 2.5, "retry_delay_s", 2.5),
    ("retryDelayMaxS", "retry_delay_max_s", 60, "retry_delay_max_s", 60),
]


@pytest.mark.parametrize(("camel", "snake", "value", "attr", "expected"), PARAMETERS)
@pytest.mark.parametrize("spelling", ["camel", "snake"])
def test_every_parameter_in_both_spellings(
    spelling: str, camel: str, snake: str, value: Any, attr: str, expected: Any
) -> None:
    params = {k: v for k, v in BASE.items() if k != camel}
    params[camel if spelling == "camel" else snake] = value
    assert _plain(getattr(one_instance(params), attr)) == expected


def test_defaults() -> None:
    config = parse_config({"instances": {"Alerts": BASE}}, {})
    instance = config.instances["Alerts"]
    assert instance.port == 25
    assert instance.use_ssl is False
    assert instance.use_default_credentials is False
    assert instance.user_name == ""
    assert instance.password.get_secret_value() == ""
    assert instance.subject_prefix == ""
    assert instance.endpoint == ""
    assert instance.ca_file is None
    assert config.interface_of("Alerts") == "Alerts"
    assert config.broker_url == names.DEFAULT_BROKER_URL
    assert config.backend_url == config.broker_url
    assert config.visibility_timeout_s == 3600
    assert config.attachment_root is None


def test_interface_when_given() -> None:
    config = parse_config({"instances": {"Alerts": {**BASE, "interface": "Monitoring"}}}, {})
    assert config.interface_of("Alerts") == "Monitoring"


def test_sender_address_is_the_addr_spec() -> None:
    instance = one_instance({**BASE, "sender": "Alerts <alerts@example.com>"})
    assert instance.sender_address == "alerts@example.com"


def test_password_is_not_shown() -> None:
    instance = one_instance({**BASE, "password": "s3cret"})
    assert "s3cret" not in repr(instance)
    assert "s3cret" not in str(instance.model_dump())


# --- ${NAME} ------------------------------------------------------------------------------


EXPANSIONS = [
    # parameters, environment, attribute, expected
    ({"password": "${SMTP_PASSWORD}"}, {"SMTP_PASSWORD": "pw"}, "password", "pw"),
    ({"userName": "${USER_}"}, {"USER_": "alerts"}, "user_name", "alerts"),
    ({"mailServer": "${HOST}"}, {"HOST": "smtp.example.org"}, "mail_server", "smtp.example.org"),
    ({"endpoint": "ops-${STAGE}-mail"}, {"STAGE": "prod"}, "endpoint", "ops-prod-mail"),
    ({"endpoint": "${A}${B}"}, {"A": "x", "B": "y"}, "endpoint", "xy"),
    ({"port": "${PORT}"}, {"PORT": "2525"}, "port", 2525),
    (
        {"recipients": ["${OPS}", "b@example.com"]},
        {"OPS": "ops@example.com"},
        "recipients",
        ["ops@example.com", "b@example.com"],
    ),
    ({"password": "${EMPTY}"}, {"EMPTY": ""}, "password", ""),
    ({"password": "no $ expansion {here}"}, {}, "password", "no $ expansion {here}"),
]


@pytest.mark.parametrize(("params", "env", "attr", "expected"), EXPANSIONS)
def test_variables_are_expanded(
    params: dict[str, Any], env: dict[str, str], attr: str, expected: Any
) -> None:
    assert _plain(getattr(one_instance({**BASE, **params}, env), attr)) == expected


def test_top_level_variables_are_expanded() -> None:
    config = parse_config(
        {"broker_url": "${REDIS}/0", "result_backend": "${REDIS}/1", "instances": {}},
        {"REDIS": "redis://redis:6379"},
    )
    assert config.broker_url == "redis://redis:6379/0"
    assert config.result_backend == "redis://redis:6379/1"


def test_unset_variable_is_an_error_naming_instance_key_and_variable() -> None:
    (problem,) = problems({"instances": {"Alerts": {**BASE, "password": "${SMTP_PASSWORD}"}}})
    assert "'Alerts'" in problem
    assert "password" in problem
    assert "SMTP_PASSWORD" in problem
    assert "not set" in problem


def test_unset_top_level_variable_is_an_error() -> None:
    (problem,) = problems({"broker_url": "${REDIS_URL}", "instances": {}})
    assert "broker_url" in problem
    assert "REDIS_URL" in problem


# --- problems -----------------------------------------------------------------------------


def _without(key: str) -> dict[str, Any]:
    return {k: v for k, v in BASE.items() if k != key}


PROBLEMS = [
    # instance name, parameters, key the problem must name, other text it must contain
    ("Alerts", {**BASE, "colour": "red"}, "colour", "not a known key"),
    ("Alerts", {**BASE, "mail_server_name": "x"}, "mail_server_name", "not a known key"),
    ("Alerts", _without("mailServer"), "mailServer", "required"),
    ("Alerts", _without("sender"), "sender", "required"),
    ("Alerts", {**BASE, "mailServer": ""}, "mailServer", ""),
    ("Alerts", {**BASE, "mailServer": "smtp example.com"}, "mailServer", "host name"),
    ("Alerts", {**BASE, "port": "abc"}, "port", ""),
    ("Alerts", {**BASE, "port": 0}, "port", ""),
    ("Alerts", {**BASE, "port": 70000}, "port", ""),
    ("Alerts", {**BASE, "port": 25.5}, "port", ""),
    ("Alerts", {**BASE, "useSsl": "maybe"}, "useSsl", ""),
    ("Alerts", {**BASE, "sender": "not an address"}, "sender", ""),
    ("Alerts", {**BASE, "sender": "a@example.com, b@example.com"}, "sender", "one address"),
    ("Alerts", {**BASE, "recipients": "ops@example.com, nobody"}, "recipients", "nobody"),
    ("Alerts", {**BASE, "subjectPrefix": "x\r\nBcc: y@evil.example"}, "subjectPrefix", "line"),
    ("Alerts", {**BASE, "caFile": "/nonexistent/ca.pem"}, "caFile", "/nonexistent/ca.pem"),
    ("Alerts", {**BASE, "maxRetries": -1}, "maxRetries", ""),
    ("Alerts", {**BASE, "retryDelayS": 0}, "retryDelayS", ""),
    ("bad name", BASE, "bad name", "letters"),
    ("Alerts/1", BASE, "Alerts/1", "letters"),
    ("Alerts", "smtp.example.com", "Alerts", "mapping"),
]


@pytest.mark.parametrize(("name", "params", "key", "text"), PROBLEMS)
def test_each_problem_names_instance_and_key(name: str, params: Any, key: str, text: str) -> None:
    (problem,) = problems({"instances": {name: params}})
    assert f"'{name}'" in problem
    assert key in problem
    assert text in problem


@pytest.mark.parametrize(
    ("raw", "text"),
    [
        ({"instances": {}, "brokerUrl": "x"}, "brokerUrl"),
        ({"instances": {}, "visibility_timeout_s": -1}, "visibility_timeout_s"),
        ({"instances": ["Alerts"]}, "instances"),
        (["instances"], "mapping"),
        ("instances: none", "mapping"),
        ({"instances": {}, "attachment_root": "/no/such/directory"}, "is not a directory"),
        ({"instances": {}, "lost_message_after_s": 5}, "lost_message_after_s"),
        ({"instances": {}, "send_lock_lease_s": 1}, "send_lock_lease_s"),
        (
            {"instances": {"A": {"mailServer": "x", "mail_server": "y", "sender": "a@b.c"}}},
            "mailServer and mail_server are the same parameter",
        ),
    ],
)
def test_top_level_problems(raw: Any, text: str) -> None:
    (problem,) = problems(raw)
    assert text in problem


def test_all_problems_are_reported_at_once() -> None:
    raw = {
        "visibility_timeout_s": 0,
        "instances": {
            "Alerts": {**BASE, "colour": "red"},
            "NoServer": _without("mailServer"),
            "NoSender": _without("sender"),
            "BadPort": {**BASE, "port": "abc"},
            "bad name": BASE,
            "Secret": {**BASE, "password": "${UNSET_PASSWORD}"},
            "Fine": BASE,
        },
    }
    found = problems(raw)
    expected = [
        ("visibility_timeout_s",),
        ("'Alerts'", "colour"),
        ("'NoServer'", "mailServer"),
        ("'NoSender'", "sender"),
        ("'BadPort'", "port"),
        ("'bad name'",),
        ("'Secret'", "UNSET_PASSWORD"),
    ]
    assert len(found) == len(expected), found
    for fragments in expected:
        assert any(all(f in p for f in fragments) for p in found), (fragments, found)
    with pytest.raises(ConfigError) as info:
        parse_config(raw, {})
    message = str(info.value)
    assert "\n" not in message
    for fragments in expected:
        assert all(f in message for f in fragments)


# --- environment overrides ----------------------------------------------------------------


FILE_URLS = {"broker_url": "redis://file:6379/0", "result_backend": "redis://file:6379/1"}


@pytest.mark.parametrize(
    ("env", "broker", "backend"),
    [
        ({}, "redis://file:6379/0", "redis://file:6379/1"),
        ({names.ENV_BROKER_URL: "redis://env:6379/0"}, "redis://env:6379/0", "redis://file:6379/1"),
        (
            {names.ENV_RESULT_BACKEND: "redis://env:6379/1"},
            "redis://file:6379/0",
            "redis://env:6379/1",
        ),
        (
            {
                names.ENV_BROKER_URL: "redis://env:6379/0",
                names.ENV_RESULT_BACKEND: "redis://env:6379/1",
            },
            "redis://env:6379/0",
            "redis://env:6379/1",
        ),
    ],
)
def test_environment_overrides_the_file(env: dict[str, str], broker: str, backend: str) -> None:
    config = parse_config({**FILE_URLS, "instances": {}}, env)
    assert config.broker_url == broker
    assert config.backend_url == backend


def test_result_backend_defaults_to_the_broker() -> None:
    config = parse_config({"instances": {}}, {names.ENV_BROKER_URL: "redis://env:6379/0"})
    assert config.backend_url == "redis://env:6379/0"


def test_attachment_root_from_the_environment(tmp_path: Path) -> None:
    config = parse_config({"instances": {}}, {ENV_ATTACHMENT_ROOT: str(tmp_path)})
    assert config.attachment_root == tmp_path


# --- load_config --------------------------------------------------------------------------


YAML = """\
broker_url: redis://localhost:6379/0
visibility_timeout_s: 120
instances:
  Alerts:
    mailServer: smtp.example.com
    port: 587
    useSsl: true
    userName: alerts
    password: ${SMTP_PASSWORD}
    recipients: "ops@example.com, Oncall <oncall@example.com>"
    sender: alerts@example.com
    subjectPrefix: "Test - "
"""


def test_load_config_reads_the_file_named_by_the_environment(tmp_path: Path) -> None:
    path = tmp_path / "mailsender.yaml"
    path.write_text(YAML, encoding="utf-8")
    config = load_config(env={ENV_CONFIG: str(path), "SMTP_PASSWORD": "pw"})
    assert isinstance(config, Config)
    assert config.visibility_timeout_s == 120
    alerts = config.instances["Alerts"]
    assert alerts.port == 587
    assert alerts.password.get_secret_value() == "pw"


def test_load_config_explicit_path_wins(tmp_path: Path) -> None:
    path = tmp_path / "mailsender.yaml"
    path.write_text(YAML, encoding="utf-8")
    env = {ENV_CONFIG: str(tmp_path / "other.yaml"), "SMTP_PASSWORD": "pw"}
    assert "Alerts" in load_config(path, env=env).instances


def _one_sentence(exc: ConfigError) -> str:
    message = str(exc)
    assert len(exc.problems) == 1
    assert "\n" not in message
    assert "Traceback" not in message
    return message


def test_load_config_missing_file_is_one_sentence(tmp_path: Path) -> None:
    path = tmp_path / "missing.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    message = _one_sentence(info.value)
    assert str(path) in message
    assert "not found" in message


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("instances: [unclosed\n", None),
        ("instances:\n  Alerts:\n    mailServer: 'open\n", None),
        ("a: 1\n\tb: 2\n", 2),
        ("instances:\n  A: {}\n  A: {}\n", 3),  # a key given twice is not "the last wins"
    ],
)
def test_load_config_invalid_yaml_is_one_sentence(
    tmp_path: Path, text: str, line: int | None
) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    message = _one_sentence(info.value)
    assert str(path) in message
    assert "not valid YAML" in message
    if line is not None:
        assert f"line {line}" in message


def test_load_config_empty_file_has_no_instances(tmp_path: Path) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text("", encoding="utf-8")
    assert load_config(path, env={}).instances == {}
