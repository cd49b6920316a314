"""The worker's configuration: instances from YAML (contract §1), validated once at the edge.

Pure: ``parse_config`` takes the loaded YAML and an environment mapping and returns a typed
``Config`` or raises ``ConfigError`` listing every problem, each naming instance and key.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel, to_snake

from producer import names
from producer.models import INSTANCE_NAME_PATTERN, check_header_text, parse_address_list
from worker.errors import ConfigError

ENV_CONFIG = "MAILSENDER_CONFIG"
DEFAULT_CONFIG_PATH = "./mailsender.yaml"
ENV_ATTACHMENT_ROOT = "MAILSENDER_ATTACHMENT_ROOT"
ENV_LOG_FORMAT = "MAILSENDER_LOG_FORMAT"

DAY_S = 24 * 3600.0
MAX_CONFIG_BYTES = 1024 * 1024

_VAR = re.compile(r"\$\{([^}]*)\}")
_INSTANCE_NAME = re.compile(INSTANCE_NAME_PATTERN)


_RATE = re.compile(r"^\s*(\d+)\s*/\s*(s|sec|second|m|min|minute|h|hour)\s*$")
_WINDOWS_S = {
    "s": 1.0,
    "sec": 1.0,
    "second": 1.0,
    "m": 60.0,
    "min": 60.0,
    "minute": 60.0,
    "h": 3600.0,
    "hour": 3600.0,
}


def parse_rate_limit(value: str) -> tuple[int, float]:
    """``"100/m"`` → (100, 60.0). Raises ``ValueError`` for anything else."""
    match = _RATE.match(value)
    if not match or int(match.group(1)) < 1:
        raise ValueError(f"{value!r} is not a rate like '10/s', '600/m' or '5000/h'")
    return int(match.group(1)), _WINDOWS_S[match.group(2)]


def _not_a_bool(value: Any) -> Any:
    """Refuse YAML's ``true``/``false`` for a number: Python counts them as 1 and 0, so
    ``port: true`` would quietly become port 1."""
    if isinstance(value, bool):
        raise ValueError(f"must be a number, not {str(value).lower()}")
    return value


Int = Annotated[int, BeforeValidator(_not_a_bool)]
"""An integer parameter; numbers as text ("587", from ``${PORT}``) count, true/false do not."""

Float = Annotated[float, BeforeValidator(_not_a_bool)]
"""A number parameter; numbers as text count, true/false do not."""


_KOMBU_KEYS = "kombu's Redis transport keeps its unacknowledged messages under that key"
RESERVED_QUEUES: dict[str, str] = {
    names.EVENTS_QUEUE: (
        "it is MailSender's events queue, and the worker would consume its own Done and "
        "Failed events for ever"
    ),
    "unacked": _KOMBU_KEYS,
    "unacked_index": _KOMBU_KEYS,
    "unacked_mutex": _KOMBU_KEYS,
}
"""Queue names an instance may not route to, and why (they are Redis keys of someone else)."""

RESERVED_QUEUE_PREFIXES: dict[str, str] = {
    names.KEY_PREFIX: "names starting with 'mailsender:' are MailSender's own Redis keys",
    "_kombu": "names starting with '_kombu' are kombu's Redis keys (queue bindings)",
    "celery-task-meta-": "names starting with 'celery-task-meta-' are Celery's result keys",
    "celery-taskset-meta-": "names starting with 'celery-taskset-meta-' are Celery's result keys",
    "celeryev": "names starting with 'celeryev' are Celery's monitoring event queues",
}
"""Prefixes of queue names an instance may not route to, and why."""


def reserved_queue(queue: str) -> str | None:
    """Why ``queue`` clashes with a name MailSender, Celery or kombu use, or None."""
    why = RESERVED_QUEUES.get(queue)
    if why is None:
        why = next((w for p, w in RESERVED_QUEUE_PREFIXES.items() if queue.startswith(p)), None)
    if why is None and queue.endswith(".pidbox"):
        why = "names ending in '.pidbox' are Celery's remote-control queues"
    return why


def _split_address_list(value: str) -> list[str]:
    """Split at the commas that separate addresses (not those in quotes, <…> or comments)."""
    parts: list[str] = []
    current: list[str] = []
    quoted = escaped = False
    depth = 0
    for char in value:
        if escaped:
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == '"':
            quoted = not quoted
        elif not quoted and char in "<(":
            depth += 1
        elif not quoted and char in ">)":
            depth = max(depth - 1, 0)
        elif char == "," and not quoted and depth == 0:
            parts.append("".join(current))
            current = []
            continue
        current.append(char)
    parts.append("".join(current))
    return parts


def check_address_list(value: str) -> None:
    """Raise ``ValueError`` naming the entry of ``value`` that is not an address (not the
    whole list, when one entry of several is wrong)."""
    try:
        parse_address_list(value)
    except ValueError as exc:
        for part in _split_address_list(value):
            try:
                parse_address_list(part)
            except ValueError as part_exc:
                hint = "; separate addresses with ',', not ';'" if ";" in part else ""
                raise ValueError(f"{part_exc}{hint}") from None
        raise ValueError(str(exc)) from None


class InstanceConfig(BaseModel):
    """One configured sender instance; the seed's parameter names, camelCase or snake_case."""

    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True
    )

    mail_server: str = Field(min_length=1)
    port: Int = Field(default=25, ge=1, le=65535)
    use_ssl: bool = False
    tls: Literal["starttls", "implicit", "none"] | None = None
    use_default_credentials: bool = False
    user_name: str = ""
    password: SecretStr = SecretStr("")
    recipients: str | list[str] = ""
    sender: str
    subject_prefix: str = ""
    endpoint: str = ""
    interface: str = ""
    ca_file: Path | None = None
    max_retries: Int = Field(default=10, ge=0, le=1000)
    retry_delay_s: Float = Field(default=10.0, gt=0, le=DAY_S)
    retry_delay_max_s: Float = Field(default=600.0, gt=0, le=7 * DAY_S)
    timeout_s: Float = Field(default=60.0, gt=0, le=3600)
    max_connections: Int = Field(default=8, ge=1, le=100)
    queue: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_.:\-]{1,100}$")
    rate_limit: str | None = None
    max_message_bytes: Int = Field(default=35 * 1024 * 1024, gt=0, le=1024**3)

    @field_validator("mail_server")
    @classmethod
    def _host_ok(cls, value: str) -> str:
        if any(c.isspace() for c in value) or "/" in value:
            raise ValueError(f"{value!r} is not a host name or IP address")
        return value

    @field_validator("recipients", mode="before")
    @classmethod
    def _recipients_type(cls, value: Any) -> Any:
        if isinstance(value, str):
            return value
        if isinstance(value, list) and all(isinstance(item, str) for item in value):
            return value
        raise ValueError("must be a string or a list of strings")

    @field_validator("recipients")
    @classmethod
    def _recipients_ok(cls, value: str | list[str]) -> str | list[str]:
        for item in [value] if isinstance(value, str) else value:
            check_address_list(item)
        return value

    @field_validator("queue")
    @classmethod
    def _queue_not_reserved(cls, value: str | None) -> str | None:
        why = reserved_queue(value) if value is not None else None
        if why is not None:
            raise ValueError(f"{value!r} cannot be used: {why}")
        return value

    @field_validator("sender")
    @classmethod
    def _sender_ok(cls, value: str) -> str:
        addresses = parse_address_list(value)
        if len(addresses) != 1:
            raise ValueError("must be exactly one address")
        return value

    @field_validator("subject_prefix", "endpoint", "interface")
    @classmethod
    def _header_safe(cls, value: str) -> str:
        return check_header_text(value)

    @field_validator("ca_file")
    @classmethod
    def _ca_file_exists(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError(f"file {str(value)!r} does not exist")
        return value

    @field_validator("rate_limit")
    @classmethod
    def _rate_limit_ok(cls, value: str | None) -> str | None:
        if value is not None:
            parse_rate_limit(value)
        return value

    @property
    def rate(self) -> tuple[int, float] | None:
        """``rateLimit`` as (mails, window in seconds), or None."""
        return parse_rate_limit(self.rate_limit) if self.rate_limit else None

    @model_validator(mode="after")
    def _tls_consistent(self) -> InstanceConfig:
        if self.use_ssl and self.tls == "none":
            raise ValueError("useSsl: true contradicts tls: none")
        return self

    @model_validator(mode="after")
    def _delays_consistent(self) -> InstanceConfig:
        if self.retry_delay_s > self.retry_delay_max_s:
            default = "" if "retry_delay_max_s" in self.model_fields_set else ", the default"
            raise ValueError(
                f"retryDelayS ({self.retry_delay_s:g}) is larger than retryDelayMaxS "
                f"({self.retry_delay_max_s:g}{default}): the first back-off cannot be longer "
                "than the longest one"
            )
        return self

    @property
    def tls_mode(self) -> str:
        """``starttls``, ``implicit`` or ``none``: ``tls`` if set, else from ``useSsl``."""
        return self.tls or ("starttls" if self.use_ssl else "none")

    @property
    def sender_address(self) -> str:
        """The envelope sender (addr-spec only)."""
        return parse_address_list(self.sender)[0].addr_spec


def _url_ok(value: str, schemes: tuple[str, ...]) -> str:
    scheme = value.split("://", 1)[0].lower() if "://" in value else ""
    if scheme not in schemes:
        allowed = ", ".join(f"{s}://" for s in schemes)
        raise ValueError(f"{value!r} is not a URL of a supported kind ({allowed})")
    return value


class Config(BaseModel):
    """The whole worker configuration."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    broker_url: str = names.DEFAULT_BROKER_URL
    result_backend: str = ""
    visibility_timeout_s: Float = Field(default=3600.0, gt=0, le=30 * DAY_S)
    # Longer than a producer's publish retries (about 6 s), so that an event whose publish
    # finally failed (EnqueueFailed) is not enqueued by the sweep after all.
    lost_message_after_s: Float | None = Field(default=None, ge=10, le=30 * DAY_S)
    # A send lock is renewed every third of this while its worker lives; a killed worker's
    # events wait at most this long before another worker may send them.
    send_lock_lease_s: Float = Field(default=60.0, ge=3, le=DAY_S)
    broker_transport_options: dict[str, Any] = Field(default_factory=dict)
    idempotency_ttl_s: Float = Field(default=7 * DAY_S, gt=0, le=366 * DAY_S)
    dead_letter_max: Int = Field(default=10000, ge=1, le=10_000_000)
    transactions_max: Int = Field(default=100000, ge=1, le=100_000_000)
    attachment_root: Path | None = None
    log_format: Literal["text", "json"] = "text"
    instances: dict[str, InstanceConfig] = Field(default_factory=dict)

    @field_validator("broker_url")
    @classmethod
    def _broker_url_ok(cls, value: str) -> str:
        return _url_ok(value, names.BROKER_SCHEMES)

    @field_validator("result_backend")
    @classmethod
    def _backend_url_ok(cls, value: str) -> str:
        return _url_ok(value, names.BACKEND_SCHEMES) if value else value

    @field_validator("attachment_root")
    @classmethod
    def _root_is_a_directory(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_dir():
            raise ValueError(f"{str(value)!r} is not a directory")
        return value

    @property
    def lost_after_s(self) -> float:
        """After how long an enqueued event that no worker started is enqueued again."""
        return self.lost_message_after_s or self.visibility_timeout_s + 30.0

    @property
    def backend_url(self) -> str:
        """The result backend's URL (the broker's when not set)."""
        return self.result_backend or self.broker_url

    def queue_of(self, instance: str) -> str:
        """The Celery queue an instance's events are routed to."""
        inst = self.instances.get(instance)
        return (inst.queue if inst else None) or names.DEFAULT_QUEUE

    @property
    def queues(self) -> list[str]:
        """Every queue a worker of this configuration consumes by default."""
        extra = sorted({i.queue for i in self.instances.values() if i.queue})
        return [names.DEFAULT_QUEUE, *[q for q in extra if q != names.DEFAULT_QUEUE]]

    def interface_of(self, instance: str) -> str:
        """The interface an instance's transactions are grouped under."""
        return self.instances[instance].interface or instance


WORKER_ONLY_KEYS = frozenset({"attachment_root"})
"""Top-level keys a lenient (client) parse ignores: paths on the worker's machine."""

WORKER_ONLY_PARAMETERS = frozenset({"ca_file"})
"""Instance parameters (snake_case) a lenient (client) parse ignores."""


def _expand(
    value: Any,
    env: Mapping[str, str],
    where: str,
    errors: list[str],
    unset: list[str] | None = None,
) -> Any:
    """Replace ``${NAME}`` in every string from ``env``; note each problem in ``errors`` and,
    in ``unset``, the names of the variables that are not set."""
    if isinstance(value, str):

        def sub(match: re.Match[str]) -> str:
            name = match.group(1)
            if not name.strip():
                errors.append(
                    f"{where}: {match.group()} is an empty variable reference; put the name "
                    "of an environment variable between the braces"
                )
                return ""
            if name not in env:
                errors.append(f"{where}: environment variable ${{{name}}} is not set")
                if unset is not None:
                    unset.append(name)
                return ""
            return env[name]

        return _VAR.sub(sub, value)
    if isinstance(value, dict):
        return {
            k: _expand(v, env, f"{where}.{k}" if where else str(k), errors, unset)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [_expand(v, env, where, errors, unset) for v in value]
    return value


def _describe(prefix: str, exc: ValidationError, ignore: set[str] | None = None) -> list[str]:
    """One problem per error; those about the parameters in ``ignore`` (snake_case) are
    dropped."""
    out = []
    for err in exc.errors(include_url=False):
        if ignore and err["loc"] and to_snake(str(err["loc"][0])) in ignore:
            continue
        loc = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "is not a known key"
        elif err["type"] == "missing":
            msg = "is required"
        out.append(f"{prefix}{loc}: {msg}" if loc else f"{prefix}{msg}")
    return out


def parse_config(raw: Any, env: Mapping[str, str], *, lenient: bool = False) -> Config:
    """Validate a loaded YAML document; raise ``ConfigError`` listing every problem.

    ``lenient`` is for clients (``mailsender send``, ``events``, ``transactions``, ``replay``),
    which need the broker and result backend URLs but not the instances' secrets: an instance
    parameter whose ``${NAME}`` is not set is left out (its default applies), an instance
    that cannot be built without it is left out of the result, and the paths only workers
    read (``WORKER_ONLY_KEYS``, ``WORKER_ONLY_PARAMETERS``), which need not exist where the
    client runs, are ignored. Every other problem, including an unset variable outside the
    instances, is still an error. Workers and ``mailsender check`` parse strictly.
    """
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(["the configuration must be a YAML mapping with an 'instances' key"])
    errors: list[str] = []
    raw = dict(raw)
    instances_raw = raw.pop("instances", None) or {}
    if lenient:
        raw = {k: v for k, v in raw.items() if k not in WORKER_ONLY_KEYS}
    top: dict[str, Any] = {}
    for key, value in raw.items():
        key_errors: list[str] = []
        expanded_value = _expand(value, env, str(key), key_errors)
        errors.extend(key_errors)
        if not key_errors:  # a key whose ${NAME} is unset is reported once, not validated too
            top[key] = expanded_value
    overrides = {
        names.ENV_BROKER_URL: "broker_url",
        names.ENV_RESULT_BACKEND: "result_backend",
        ENV_ATTACHMENT_ROOT: "attachment_root",
        ENV_LOG_FORMAT: "log_format",
    }
    for variable, key in overrides.items():
        if env.get(variable, "").strip():  # set but empty counts as unset
            top[key] = env[variable].strip()
    if lenient:
        for key in WORKER_ONLY_KEYS:
            top.pop(key, None)
    instances: dict[str, InstanceConfig] = {}
    if not isinstance(instances_raw, dict):
        errors.append("instances: must be a mapping of instance name to its parameters")
        instances_raw = {}
    for name, params in instances_raw.items():
        if not isinstance(name, str):
            errors.append(f"instance {name!r}: the name must be text (quote it in YAML)")
            continue
        prefix = f"instance {name!r}: "
        if not _INSTANCE_NAME.match(name):
            errors.append(f"{prefix}the name may contain only letters, digits, '_', '-' and '.'")
            continue
        if not isinstance(params, dict):
            errors.append(f"{prefix}must be a mapping of parameters")
            continue
        spellings: dict[str, list[str]] = {}
        for key in params:
            if isinstance(key, str):
                spellings.setdefault(to_snake(key), []).append(key)
        twice = [keys for keys in spellings.values() if len(keys) > 1]
        if twice:
            errors.extend(
                f"{prefix}{' and '.join(keys)} are the same parameter; give it once"
                for keys in twice
            )
            continue
        expanded: dict[Any, Any] = {}
        left_out: set[str] = set()  # parameters with a ${NAME} problem: not validated too
        for key, value in params.items():
            if lenient and to_snake(str(key)) in WORKER_ONLY_PARAMETERS:
                continue
            var_errors: list[str] = []
            unset: list[str] = []
            expanded_value = _expand(value, env, str(key), var_errors, unset)
            if var_errors:
                left_out.add(to_snake(str(key)))
                if not (lenient and len(unset) == len(var_errors)):
                    errors.extend(prefix + e for e in var_errors)
                continue
            expanded[key] = expanded_value
        try:
            instances[name] = InstanceConfig.model_validate(expanded)
        except ValidationError as exc:
            # Problems of left-out parameters are reported once, above (or, lenient, not at
            # all: the instance is then left out as a whole).
            errors.extend(_describe(prefix, exc, ignore=left_out))
    try:
        config = Config.model_validate({**top, "instances": {}})
    except ValidationError as exc:
        errors.extend(_describe("", exc))
        raise ConfigError(errors) from None
    if errors:
        raise ConfigError(errors)
    return config.model_copy(update={"instances": instances})


def load_config(
    path: str | Path | None = None,
    env: Mapping[str, str] | None = None,
    *,
    lenient: bool = False,
) -> Config:
    """Read the YAML file (``MAILSENDER_CONFIG``, default ``./mailsender.yaml``) and validate it
    (``lenient``: see ``parse_config``). Raises ``ConfigError``."""
    env = os.environ if env is None else env
    path = Path(path or env.get(ENV_CONFIG) or DEFAULT_CONFIG_PATH)
    try:
        if path.is_file() and path.stat().st_size > MAX_CONFIG_BYTES:
            raise ConfigError([f"configuration file {str(path)!r} is larger than 1 MiB"])
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError([f"configuration file {str(path)!r} is not UTF-8 text"]) from None
    except FileNotFoundError:
        raise ConfigError(
            [f"configuration file {str(path)!r} not found (set {ENV_CONFIG} to its path)"]
        ) from None
    except OSError as exc:
        raise ConfigError(
            [f"configuration file {str(path)!r} cannot be read: {exc.strerror}"]
        ) from None
    try:
        raw = yaml.load(text, Loader=_NoAliasLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        why = " (aliases like *name are not allowed)" if "alias" in str(exc) else ""
        if "given twice" in str(exc):
            why = f": {getattr(exc, 'problem', '')}"
        raise ConfigError(
            [f"configuration file {str(path)!r} is not valid YAML{where}{why}"]
        ) from None
    return parse_config(raw, env, lenient=lenient)


class _NoAliasLoader(yaml.SafeLoader):
    """YAML without aliases: a few nested aliases can expand to gigabytes ("billion laughs")."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()  # type: ignore[no-untyped-call]
            raise yaml.composer.ComposerError(
                None, None, "aliases are not allowed", event.start_mark
            )
        return super().compose_node(parent, index)

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        """A key given twice is an error, not a silent "the last one wins"."""
        seen: set[Any] = set()
        for key_node, _value in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, str | int | float | bool):
                continue
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"the key {key!r} is given twice", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)
