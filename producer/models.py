"""The contract's data: mail events, attachments, transactions and instance events.

Every model accepts the seed's camelCase names and their snake_case spelling, and is dumped
with camelCase (``to_json``). Validation is strict about anything that would end up in a
header: CR and LF are rejected, also when hidden in an RFC 2047 encoded word.
"""

from __future__ import annotations

import base64
import binascii
import functools
import re
import uuid
from datetime import UTC, datetime
from email.header import decode_header
from email.headerregistry import Address
from email.policy import default as default_policy
from typing import Annotated, Any, get_args

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)
from pydantic.alias_generators import to_camel
from pydantic.fields import FieldInfo

from producer.errors import InvalidEvent

INSTANCE_NAME_PATTERN = r"^[A-Za-z0-9_.\-]+$"
EVENT_ID_PATTERN = re.compile(r"^[A-Za-z0-9_.:@\-]{1,200}$")
"""What an event id may be (it is also the Celery task id and part of Redis keys)."""
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_LINE_SEPARATOR = re.compile("[\x85\u2028\u2029]")
_SURROGATE = re.compile("[\ud800-\udfff]")
_CONTENT_TYPE_PATTERN = re.compile(r"^[A-Za-z0-9!#$&^_.+\-]+/[A-Za-z0-9!#$&^_.+\-]+$")
BLOB_KEY_PREFIX = "mailsender:blob:"
_BLOB_KEY_PATTERN = re.compile(r"^mailsender:blob:[A-Za-z0-9_.:@\-]{1,200}$")
_ASCII_WHITESPACE = re.compile(r"[ \t\n\r\f\v]+")
"""What may separate the lines of base64 content (MIME and ``base64`` wrap it at 76)."""
_NOT_BASE64 = re.compile(r"[^A-Za-z0-9+/= \t\n\r\f\v]")
_BASE64_EXPECTED = "expected standard base64 with padding (A-Z, a-z, 0-9, '+', '/' and '=')"


class _Model(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        frozen=True,
        str_strip_whitespace=False,
    )

    def to_json(self) -> dict[str, Any]:
        """The JSON object of the contract (camelCase keys)."""
        return self.model_dump(mode="json", by_alias=True)


# --- header safety ------------------------------------------------------------------------


def check_header_text(value: str) -> str:
    """Return ``value`` if it can go into a header; raise ``ValueError`` otherwise.

    CR and LF are refused, also inside RFC 2047 encoded words (``=?UTF-8?Q?=0A?=``), which the
    standard library decodes when it parses a header value.
    """
    if "\r" in value or "\n" in value:
        raise ValueError("contains a line break (CR or LF), which is not allowed in a header")
    if _LINE_SEPARATOR.search(value):
        raise ValueError(
            "contains a Unicode line separator (U+0085, U+2028 or U+2029), which is not "
            "allowed in a header"
        )
    check_unicode(value)
    if _CONTROL.search(value):
        raise ValueError("contains a control character, which is not allowed in a header")
    if "=?" in value:
        try:
            parts = decode_header(value)
        except Exception as exc:
            raise ValueError(f"contains a malformed encoded word ({exc})") from exc
        for raw, charset in parts:
            text = raw.decode(charset or "ascii", "replace") if isinstance(raw, bytes) else raw
            if "\r" in text or "\n" in text:
                raise ValueError(
                    "contains an encoded line break (CR or LF), which is not allowed in a header"
                )
    return value


def check_unicode(value: str) -> str:
    """Return ``value`` if it is valid Unicode text; raise ``ValueError`` for a lone surrogate
    (what undecodable bytes become, e.g. a command-line argument that is not UTF-8)."""
    match = _SURROGATE.search(value)
    if match:
        raise ValueError(
            f"contains {match.group()!r} at position {match.start()}, which is not valid "
            "Unicode text (undecodable bytes?)"
        )
    return value


def parse_address_list(value: str) -> list[Address]:
    """Parse an address list the way mail clients do (``"Doe, Jane" <jane@x>`` stays one).

    Empty entries are skipped. Raises ``ValueError`` naming the entry that is not an address.
    """
    return list(_parse_address_list(value))


@functools.lru_cache(maxsize=8192)
def _parse_address_list(value: str) -> tuple[Address, ...]:
    # Cached: the same sender and recipients come again and again, and the stdlib parser is
    # among the costliest steps per mail. Address objects are immutable; errors are not cached.
    check_header_text(value)
    if not value.strip():
        return ()
    try:
        header = default_policy.header_factory("To", value)
    except Exception as exc:  # the stdlib parser raises IndexError & co. on some garbage
        raise ValueError(f"{value.strip()!r} is not a valid address list") from exc
    addresses: list[Address] = list(header.addresses)
    problems = [
        str(d) for d in header.defects if "no content" not in str(d) and "non-ASCII" not in str(d)
    ]
    for address in addresses:
        if not address.username or not address.domain or " " in address.addr_spec:
            shown = address.addr_spec if address.username else value.strip()
            raise ValueError(f"{shown!r} is not a valid e-mail address")
    if problems:
        raise ValueError(f"{value.strip()!r} is not a valid address list ({problems[0]})")
    return tuple(addresses)


def _to_address_strings(value: Any) -> list[str]:
    """Accept a comma-separated string or a list of strings; return one string per address."""
    if value is None:
        return []
    if isinstance(value, str):
        items = [value]
    elif isinstance(value, list | tuple):
        items = list(value)
        for item in items:
            if not isinstance(item, str):
                raise ValueError(f"each address must be a string, not {type(item).__name__}")
    else:
        raise ValueError("must be a comma-separated string or a list of strings")
    result: list[str] = []
    seen: set[str] = set()
    for item in items:
        for address in parse_address_list(item):
            key = address.addr_spec.lower()
            if key not in seen:
                seen.add(key)
                result.append(str(address))
    return result


AddressList = Annotated[list[str], BeforeValidator(_to_address_strings)]
"""Addresses, given as one comma-separated string or a list; parsed, de-duplicated."""


# --- mail events --------------------------------------------------------------------------


class Attachment(_Model):
    """One attachment: inline (``filename`` + base64 ``content``), by ``path`` in the worker's
    attachment root, or by ``blob``: the key of its bytes in the result backend's Redis
    (``mailsender:blob:…``), which ``MailProducer`` uses for large inline attachments."""

    filename: str | None = None
    content: str | None = None
    content_type: str | None = None
    path: str | None = None
    blob: str | None = None

    @field_validator("filename")
    @classmethod
    def _filename_ok(cls, value: str | None) -> str | None:
        if value is None:
            return None
        check_header_text(value)
        if not value.strip():
            raise ValueError("must not be empty")
        if "/" in value or "\\" in value or "\x00" in value:
            raise ValueError("must be a plain file name without a directory")
        return value

    @field_validator("content_type")
    @classmethod
    def _content_type_ok(cls, value: str | None) -> str | None:
        if value is not None and not _CONTENT_TYPE_PATTERN.match(value):
            raise ValueError(f"{value!r} is not a MIME type like 'application/pdf'")
        return value

    @field_validator("content")
    @classmethod
    def _content_is_base64(cls, value: str | None) -> str | None:
        # Line-wrapped base64 (MIME, ``base64.encodebytes``, the ``base64`` tool) is accepted
        # and kept without its line breaks, so that ``decoded`` can decode strictly.
        if value is None:
            return None
        compact = _ASCII_WHITESPACE.sub("", value)
        try:
            base64.b64decode(compact, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ValueError(_base64_problem(value, compact)) from exc
        return compact

    @field_validator("path")
    @classmethod
    def _path_ok(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if "\x00" in value:
            raise ValueError("contains a NUL character, which a file path cannot contain")
        if not value.strip():
            raise ValueError("must be a non-empty file path")
        return value

    @model_serializer(mode="wrap")
    def _given_only(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # Keys that are not set are left out, so that workers which do not know 'blob' yet
        # (unknown keys are refused) take events from newer producers.
        return {k: v for k, v in handler(self).items() if v is not None}

    @field_validator("blob")
    @classmethod
    def _blob_ok(cls, value: str | None) -> str | None:
        if value is not None and not _BLOB_KEY_PATTERN.match(value):
            raise ValueError(f"must be a key like '{BLOB_KEY_PREFIX}<id>'")
        return value

    @model_validator(mode="after")
    def _inline_or_path(self) -> Attachment:
        given = [k for k in ("content", "path", "blob") if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(
                f"give one of 'content', 'path' or 'blob', not both {' and '.join(given)}"
            )
        if self.path is None and (not given or self.filename is None):
            raise ValueError("an inline attachment needs 'filename' and 'content' (base64)")
        return self

    def decoded(self) -> bytes:
        """The inline content's bytes (raises ``ValueError`` for a path attachment)."""
        if self.content is None:
            raise ValueError("a path attachment has no inline content")
        return base64.b64decode(self.content, validate=True)

    @classmethod
    def inline(cls, filename: str, data: bytes, content_type: str | None = None) -> Attachment:
        """An inline attachment from bytes."""
        return cls(
            filename=filename,
            content=base64.b64encode(data).decode("ascii"),
            content_type=content_type,
        )


def _base64_problem(given: str, compact: str) -> str:
    """Why ``given`` (``compact`` without its whitespace) is not standard base64, in words."""
    odd = _NOT_BASE64.search(given)
    if odd:
        hint = " (URL-safe base64?)" if odd.group() in "-_" else ""
        return (
            f"is not valid base64: {odd.group()!r} at position {odd.start()} is not a base64 "
            f"character{hint}; {_BASE64_EXPECTED}"
        )
    if len(compact) % 4:
        return (
            f"is not valid base64: its length without line breaks ({len(compact)}) is not a "
            f"multiple of 4 (padding '=' missing?); {_BASE64_EXPECTED}"
        )
    return f"is not valid base64: '=' may appear only as padding at the end; {_BASE64_EXPECTED}"


def _attachments_in(value: Any) -> Any:
    """A single string of paths separated by ';' is accepted too (the seed's form)."""
    if value is None:
        return []
    if isinstance(value, str):
        return [{"path": p.strip()} for p in value.split(";") if p.strip()]
    return value


def _new_event_id() -> str:
    return str(uuid.uuid4())


class MailEvent(_Model):
    """A mail event (contract §2). Construct with either spelling of each field (invalid fields
    raise pydantic's ``ValidationError``); ``parse`` raises ``InvalidEvent`` with one sentence."""

    instance: str = Field(pattern=INSTANCE_NAME_PATTERN, max_length=200)
    subject: str = ""
    message: str = ""
    is_html: bool = False
    recipients: AddressList = Field(default_factory=list)
    cc: AddressList = Field(default_factory=list)
    bcc: AddressList = Field(default_factory=list)
    reply_to: str | None = None
    attachments: Annotated[list[Attachment], BeforeValidator(_attachments_in)] = Field(
        default_factory=list
    )
    event_id: str = Field(default_factory=_new_event_id)

    @field_validator("subject")
    @classmethod
    def _subject_ok(cls, value: str) -> str:
        return check_header_text(value)

    @field_validator("message")
    @classmethod
    def _message_ok(cls, value: str) -> str:
        return check_unicode(value)

    @field_validator("reply_to")
    @classmethod
    def _reply_to_ok(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        addresses = parse_address_list(value)
        return ", ".join(str(a) for a in addresses) or None

    @field_validator("event_id")
    @classmethod
    def _event_id_ok(cls, value: str) -> str:
        if not EVENT_ID_PATTERN.match(value):
            raise ValueError(
                "must be 1 to 200 characters of letters, digits and '_.:@-' (no spaces)"
            )
        return value

    @classmethod
    def parse(cls, data: MailEvent | dict[str, Any]) -> MailEvent:
        """Validate ``data``; raise ``InvalidEvent`` with one sentence naming each bad field."""
        if isinstance(data, MailEvent):
            return data
        if not isinstance(data, dict):
            raise InvalidEvent(
                f"invalid mail event: expected a JSON object, got {type(data).__name__}"
            )
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise InvalidEvent(f"invalid mail event: {describe_validation_error(exc)}") from None


def describe_validation_error(exc: ValidationError, model: type[BaseModel] | None = None) -> str:
    """One sentence for all of a pydantic error's entries: ``field: problem; field: problem``.

    Fields are named in the seed's camelCase spelling, whichever spelling the input used
    (``model`` is the model validated, ``MailEvent`` by default); unknown keys as given.
    """
    root = MailEvent if model is None else model
    parts: list[str] = []
    for error in exc.errors(include_url=False):
        loc = _seed_spelling(error["loc"], root) or "(event)"
        msg = error["msg"]
        msg = msg.removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            twice = _other_spelling(error["loc"], root)
            if twice:
                msg = f"is given twice, as {twice[0]!r} and {twice[1]!r}; give one spelling only"
            else:
                msg = "is not a known field"
        elif error["type"] == "missing":
            msg = "is required"
        parts.append(f"{loc}: {msg}")
    return "; ".join(parts)


def _seed_spelling(loc: tuple[int | str, ...], model: type[BaseModel]) -> str:
    """``loc`` with every known field in camelCase, e.g. ``attachments.0.contentType``."""
    parts: list[str] = []
    current: type[BaseModel] | None = model
    for part in loc:
        found = _field(current, part)
        parts.append(str(part) if found is None else found[1].alias or found[0])
        if not isinstance(part, int):  # list indexes stay in the list's model
            current = None if found is None else _nested_model(found[1].annotation)
    return ".".join(parts)


def _other_spelling(loc: tuple[int | str, ...], model: type[BaseModel]) -> tuple[str, str] | None:
    """For an unknown key that is a field's other spelling (so the field was given in both):
    ``(camelCase, snake_case)``; else ``None``."""
    current: type[BaseModel] | None = model
    for part in loc[:-1]:
        if not isinstance(part, int):
            found = _field(current, part)
            current = None if found is None else _nested_model(found[1].annotation)
    found = _field(current, loc[-1]) if loc else None
    if found is None or not found[1].alias or found[1].alias == found[0]:
        return None
    return found[1].alias, found[0]


def _field(model: type[BaseModel] | None, key: int | str) -> tuple[str, FieldInfo] | None:
    """``model``'s field spelt ``key`` (by name or by alias): its name and info."""
    if model is None or not isinstance(key, str):
        return None
    for name, field in model.model_fields.items():
        if key in (name, field.alias):
            return name, field
    return None


def _nested_model(annotation: Any) -> type[BaseModel] | None:
    """The model inside a field's type (``list[Attachment]`` → ``Attachment``), if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        found = _nested_model(arg)
        if found is not None:
            return found
    return None


# --- outcomes -----------------------------------------------------------------------------


def utc_now() -> datetime:
    """Now, in UTC."""
    return datetime.now(UTC)


class Transaction(_Model):
    """The outcome of one event (contract §4); the Celery task result under its ``eventId``."""

    model_config = ConfigDict(extra="ignore")

    event_id: str
    instance: str
    interface: str
    endpoint: str = ""
    success: bool
    count: int
    message: str
    timestamp: datetime = Field(default_factory=utc_now)
    message_id: str = ""
    recipients: list[str] = Field(default_factory=list)
    refused: dict[str, str] = Field(default_factory=dict)
    attempts: int = 1


class InstanceEvent(_Model):
    """``<instance>.Done`` / ``<instance>.Failed`` on the events exchange (contract §4)."""

    model_config = ConfigDict(extra="ignore")

    name: str
    instance: str
    event_id: str
    transaction: Transaction
