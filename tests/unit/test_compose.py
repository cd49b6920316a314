"""The container files describe this project: commands, environment and config that exist.

Docker does not run in the test environment, so ``compose.yaml`` and the ``Dockerfile`` are
read as text and checked against the code: every command line is one the ``mailsender`` or
``celery -A worker`` commands accept, every variable a service sets is one the configuration
reads, and every configuration file mounted into a service is accepted by ``parse_config``.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from celery.bin.celery import celery as celery_command

from producer import names
from worker.cli import main as mailsender_command
from worker.config import ENV_ATTACHMENT_ROOT, ENV_CONFIG, parse_config

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "compose.yaml"
DOCKERFILE = ROOT / "Dockerfile"
APP_SERVICES = ["worker", "worker-reports", "flower"]
CONFIG_ENV = {ENV_CONFIG, names.ENV_BROKER_URL, names.ENV_RESULT_BACKEND, ENV_ATTACHMENT_ROOT}
PLACEHOLDER = re.compile(r"\$\{([^}]*)\}")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def service(compose: dict[str, Any], name: str) -> dict[str, Any]:
    services = compose["services"]
    assert name in services, f"compose.yaml has no service {name!r}"
    value = services[name]
    assert isinstance(value, dict)
    return value


def words(command: str | list[str]) -> list[str]:
    return shlex.split(command) if isinstance(command, str) else [str(w) for w in command]


def environment(svc: dict[str, Any]) -> dict[str, str]:
    """A service's environment as a mapping (compose allows a list of NAME=value too)."""
    env = svc.get("environment") or {}
    if isinstance(env, list):
        return dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


def command_problem(argv: list[str]) -> str | None:
    """Why ``argv`` is not a command line of this project, or None when it is."""
    if not argv:
        return "empty command"
    if argv[0] == "mailsender":
        if len(argv) < 2 or argv[1] not in mailsender_command.commands:
            return f"{shlex.join(argv)!r}: not a mailsender subcommand"
        return None
    if argv[0] == "celery":
        rest = argv[1:]
        app = None
        while rest and rest[0].startswith("-"):
            option = rest.pop(0)
            if option in ("-A", "--app") and rest:
                app = rest.pop(0)
            elif option.startswith("--app="):
                app = option.split("=", 1)[1]
            elif option.startswith("-A") and len(option) > 2:
                app = option[2:]
        if app != "worker":
            return f"{shlex.join(argv)!r}: the app must be given as -A worker"
        if not rest or rest[0] not in celery_command.commands:
            return f"{shlex.join(argv)!r}: not a celery subcommand"
        return None
    return f"{shlex.join(argv)!r}: neither mailsender nor celery -A worker"


@pytest.mark.parametrize(
    ("argv", "ok"),
    [
        (["mailsender", "worker", "--concurrency", "4"], True),
        (["mailsender", "check"], True),
        (["mailsender", "serve"], False),
        (["mailsender"], False),
        (["celery", "-A", "worker", "worker", "-l", "INFO"], True),
        (["celery", "--app=worker", "flower"], True),
        (["celery", "-A", "worker", "inspect", "ping"], True),
        (["celery", "-A", "worker", "frobnicate"], False),
        (["celery", "-A", "tasks", "worker"], False),
        (["celery", "worker"], False),
        (["python", "-m", "worker"], False),
    ],
)
def test_command_checker_itself(argv: list[str], ok: bool) -> None:
    assert (command_problem(argv) is None) is ok


# --- compose.yaml -------------------------------------------------------------------------


@pytest.mark.parametrize("name", APP_SERVICES)
def test_command_is_a_command_line_of_this_project(compose: dict[str, Any], name: str) -> None:
    svc = service(compose, name)
    assert "command" in svc, f"{name}: no command"
    assert command_problem(words(svc["command"])) is None


def test_worker_runs_mailsender_worker(compose: dict[str, Any]) -> None:
    assert words(service(compose, "worker")["command"])[:2] == ["mailsender", "worker"]


def test_flower_runs_flower_on_port_5555(compose: dict[str, Any]) -> None:
    svc = service(compose, "flower")
    argv = words(svc["command"])
    assert argv[argv.index("worker") + 1] == "flower"
    port = next((w.split("=", 1)[1] for w in argv if w.startswith("--port=")), "5555")
    assert port == "5555"
    assert any(str(p).endswith(":5555") or str(p) == "5555" for p in svc.get("ports", []))


def test_flower_requires_authentication(compose: dict[str, Any]) -> None:
    svc = service(compose, "flower")
    argv = words(svc["command"])
    assert "FLOWER_BASIC_AUTH" in environment(svc) or any(
        w.startswith("--basic-auth") for w in argv
    )


def mounted_configs(svc: dict[str, Any]) -> dict[str, Path]:
    """Container path → file in the repository, for every bind mount of a file."""
    mounts: dict[str, Path] = {}
    for volume in svc.get("volumes") or []:
        if isinstance(volume, str):
            source, target = volume.split(":")[:2]
        else:
            source, target = volume.get("source", ""), volume.get("target", "")
        if source.startswith((".", "/")):
            mounts[target] = (COMPOSE_FILE.parent / source).resolve()
    return mounts


def config_file(svc: dict[str, Any], name: str) -> Path:
    env = environment(svc)
    assert ENV_CONFIG in env, f"{name}: {ENV_CONFIG} is not set"
    mounts = mounted_configs(svc)
    assert env[ENV_CONFIG] in mounts, f"{name}: {env[ENV_CONFIG]} is not mounted"
    path = mounts[env[ENV_CONFIG]]
    assert path.is_file(), f"{name}: {path} does not exist in the repository"
    assert path.is_relative_to(ROOT)
    return path


@pytest.mark.parametrize("name", APP_SERVICES)
def test_environment_is_read_by_the_configuration(compose: dict[str, Any], name: str) -> None:
    svc = service(compose, name)
    placeholders = set(PLACEHOLDER.findall(config_file(svc, name).read_text(encoding="utf-8")))
    unread = [
        var
        for var in environment(svc)
        if var not in CONFIG_ENV
        and var not in placeholders
        and not (name == "flower" and var.startswith("FLOWER_"))
    ]
    assert unread == [], f"{name} sets variables nothing reads"


@pytest.mark.parametrize("name", APP_SERVICES)
def test_mounted_config_is_accepted(compose: dict[str, Any], name: str) -> None:
    svc = service(compose, name)
    text = config_file(svc, name).read_text(encoding="utf-8")
    env = environment(svc)
    # Every ${NAME} must be set by the service, or the worker refuses to start (exit 2).
    missing = sorted(set(PLACEHOLDER.findall(text)) - set(env))
    assert missing == [], f"{name}: the config uses ${{...}} names the service does not set"
    supplied = {var: "placeholder" for var in PLACEHOLDER.findall(text)}
    config = parse_config(
        yaml.safe_load(text), {**supplied, **{k: env[k] for k in CONFIG_ENV & set(env)}}
    )
    for url in (config.broker_url, config.backend_url):
        host = urlsplit(url).hostname
        assert host in compose["services"], f"{name}: {url} is not a service of compose.yaml"


def test_worker_config_sends_to_mailpit(compose: dict[str, Any]) -> None:
    svc = service(compose, "worker")
    text = config_file(svc, "worker").read_text(encoding="utf-8")
    supplied = {var: "" for var in PLACEHOLDER.findall(text)}
    config = parse_config(yaml.safe_load(text), supplied)
    assert config.instances, "the worker's config has no instance"
    assert any(i.mail_server == "mailpit" and i.port == 1025 for i in config.instances.values())
    assert any(str(v) == "${SMTP_PASSWORD}" for v in _values(yaml.safe_load(text)))


def _values(node: Any) -> list[Any]:
    if isinstance(node, dict):
        return [v for child in node.values() for v in _values(child)]
    if isinstance(node, list):
        return [v for child in node for v in _values(child)]
    return [node]


def test_mailpit_is_the_development_smtp_server(compose: dict[str, Any]) -> None:
    svc = service(compose, "mailpit")
    assert str(svc["image"]).startswith("axllent/mailpit")
    ports = " ".join(str(p) for p in svc.get("ports", []) + svc.get("expose", []))
    assert "1025" in ports and "8025" in ports


def test_redis_has_appendonly_and_a_volume(compose: dict[str, Any]) -> None:
    svc = service(compose, "redis")
    assert str(svc["image"]).startswith("redis:7")
    argv = words(svc.get("command", []))
    assert "--appendonly" in argv and argv[argv.index("--appendonly") + 1] == "yes"
    targets = [str(v).split(":")[1] for v in svc.get("volumes", []) if isinstance(v, str)]
    assert "/data" in targets


def _seconds(duration: str) -> float:
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001, "us": 0.000001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", duration)
    assert parts and "".join(a + b for a, b in parts) == duration, duration
    return sum(float(a) * units[b] for a, b in parts)


def test_worker_stops_gracefully_and_scales(compose: dict[str, Any]) -> None:
    svc = service(compose, "worker")
    assert _seconds(str(svc["stop_grace_period"])) >= 30
    assert svc.get("stop_signal", "SIGTERM") == "SIGTERM"
    assert "container_name" not in svc
    assert "hostname" not in svc  # a fixed host name gives every replica the same node name
    assert not svc.get("ports"), "fixed host ports prevent --scale worker=N"


def test_worker_depends_on_redis(compose: dict[str, Any]) -> None:
    depends = service(compose, "worker").get("depends_on") or {}
    assert "redis" in depends


# --- Dockerfile ---------------------------------------------------------------------------


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = DOCKERFILE.read_text(encoding="utf-8")
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    out = []
    for line in joined.splitlines():
        if line.strip():
            instruction, _, args = line.strip().partition(" ")
            out.append((instruction.upper(), args.strip()))
    return out


def test_dockerfile_base_user_and_command() -> None:
    instructions = dockerfile()
    assert instructions[0] == ("FROM", "python:3.11-slim")
    users = [args for ins, args in instructions if ins == "USER"]
    assert users and users[-1] not in ("root", "0")
    (cmd,) = [args for ins, args in instructions if ins == "CMD"]
    argv = json.loads(cmd)
    assert argv[:2] == ["mailsender", "worker"]
    assert command_problem(argv) is None


def test_dockerfile_healthcheck_pings_this_worker() -> None:
    (check,) = [args for ins, args in dockerfile() if ins == "HEALTHCHECK"]
    shell = check.split(" CMD ", 1)[1]
    argv = shlex.split(shell.split(">", 1)[0].split("||", 1)[0])
    assert command_problem(argv) is None
    assert argv[:5] == ["celery", "-A", "worker", "inspect", "ping"]
    assert "celery@$HOSTNAME" in argv


def test_fleet_has_two_instances_on_their_own_queues_each_with_a_worker(
    compose: dict[str, Any],
) -> None:
    svc = service(compose, "worker")
    text = config_file(svc, "worker").read_text(encoding="utf-8")
    config = parse_config(yaml.safe_load(text), {v: "" for v in PLACEHOLDER.findall(text)})
    own_queues = {i.queue for i in config.instances.values() if i.queue}
    assert len(own_queues) >= 2, "two instances on their own queues"
    consumed: set[str] = set()
    for spec in compose["services"].values():
        argv = words(spec.get("command", []))
        if argv[:2] == ["mailsender", "worker"] and "-Q" in argv:
            consumed |= set(argv[argv.index("-Q") + 1].split(","))
    assert own_queues | {names.DEFAULT_QUEUE} <= consumed, "every queue has a worker service"
