"""Building the e-mail (pure apart from reading path attachments): event + instance → message.

``build_message`` returns the bytes to send (CRLF line endings, RFC 5322) and the envelope.
Every header value is checked again after the standard library parsed it, because the
parser decodes RFC 2047 encoded words, which could otherwise smuggle a line break in.
"""

from __future__ import annotations

import base64
import functools
import mimetypes
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from email.headerregistry import Address, HeaderRegistry
from email.message import EmailMessage
from email.policy import EmailPolicy
from email.utils import format_datetime
from html.parser import HTMLParser
from pathlib import Path
from typing import Any, cast

from producer.models import (
    Attachment,
    MailEvent,
    check_header_text,
    parse_address_list,
    utc_now,
)
from worker.config import InstanceConfig
from worker.errors import PermanentError


class _CachingHeaderRegistry(HeaderRegistry):
    """The stdlib's registry builds a new header class with ``type()`` on every lookup."""

    def __init__(self) -> None:
        super().__init__()
        self._classes: dict[str, type] = {}

    def __getitem__(self, name: str) -> type:
        cls = self._classes.get(name)
        if cls is None:
            cls = self._classes[name] = super().__getitem__(name)
        return cls


_REGISTRY = _CachingHeaderRegistry()

# Headers whose short printable-ASCII values are kept verbatim (see _VerbatimPolicy).
_VERBATIM_NAMES = frozenset(
    {"from", "to", "cc", "reply-to", "subject", "date", "message-id", "x-mailsender-event-id"}
)
_PRINTABLE_ASCII = re.compile(r"[\x20-\x7e]*\Z")


def _verbatim(policy: EmailPolicy, name: str, value: object) -> bool:
    """A value that needs neither encoding nor folding: printable ASCII, no encoded-word
    marker, short enough for one line."""
    return (
        isinstance(value, str)
        and name.lower() in _VERBATIM_NAMES
        and len(name) + 2 + len(value) <= (policy.max_line_length or 78)
        and "=?" not in value
        and _PRINTABLE_ASCII.match(value) is not None
    )


class _VerbatimPolicy(EmailPolicy):
    """The default policy, except that simple header values are stored as the plain strings a
    parsed message holds, instead of being parsed into header objects.

    Parsing every value on store and refolding it on output is the costliest step per mail,
    and for a one-line printable-ASCII value both give back the input. Anything else (non-ASCII,
    long, address lists given as objects, MIME headers) goes through the header registry.
    """

    def header_store_parse(self, name: str, value: Any) -> tuple[str, Any]:
        if _verbatim(self, name, value):
            return name, value
        if isinstance(value, str):
            return name, _parsed(name, value)
        return super().header_store_parse(name, value)

    def header_fetch_parse(self, name: str, value: Any) -> Any:
        if hasattr(value, "name"):
            return value
        return _parsed(name, "".join(value.splitlines()))


_CACHED_VALUE_MAX = 500
"""Longer header values are parsed each time (the cache's memory stays small)."""


def _parsed(name: str, value: str) -> Any:
    """A header object for ``name: value``. Most values (Content-Type, MIME-Version,
    Content-Transfer-Encoding, the recipients) are the same in mail after mail, and header
    objects are immutable, so one object serves every message."""
    if len(value) > _CACHED_VALUE_MAX:
        return _REGISTRY(name, value)
    return _parsed_cached(name, value)


@functools.lru_cache(maxsize=2048)
def _parsed_cached(name: str, value: str) -> Any:
    return _REGISTRY(name, value)


class _FoldOncePolicy(EmailPolicy):
    """An output policy that folds each (cached, shared) header object once, not per mail."""

    def fold_binary(self, name: str, value: Any) -> bytes:
        if not hasattr(value, "name"):
            return super().fold_binary(name, value)
        done = getattr(value, "_mailsender_folded", None)
        if done is None or done[0] is not self or done[1] != name:
            done = (self, name, super().fold_binary(name, value))
            value._mailsender_folded = done
        return cast(bytes, done[2])


SEVEN_BIT = _VerbatimPolicy(cte_type="7bit", header_factory=_REGISTRY)
_SMTP = _FoldOncePolicy(linesep="\r\n", header_factory=_REGISTRY)
_SMTPUTF8 = _FoldOncePolicy(linesep="\r\n", utf8=True, header_factory=_REGISTRY)


@dataclass(frozen=True)
class BuiltMessage:
    """A message ready for SMTP: envelope and bytes."""

    sender: str
    recipients: list[str]
    data: bytes
    message_id: str
    needs_smtputf8: bool


def message_id_for(event_id: str, sender: str) -> str:
    """The Message-ID of an event: the same on every attempt, so receivers can de-duplicate."""
    domain = sender.rsplit("@", 1)[-1] or "mailsender.invalid"
    safe = re.sub(r"[^A-Za-z0-9_.\-]", "-", event_id)
    return f"<{safe}@{domain}>"


def _addresses(values: list[str] | str) -> list[Address]:
    items = [values] if isinstance(values, str) else values
    out: list[Address] = []
    seen: set[str] = set()
    for item in items:
        for address in parse_address_list(item):
            if address.addr_spec.lower() not in seen:
                seen.add(address.addr_spec.lower())
                out.append(address)
    return out


class _TextExtractor(HTMLParser):
    """HTML → readable plain text: block elements become line breaks, links keep their URL."""

    _BLOCK = frozenset(
        {
            "p", "div", "br", "tr", "li", "h1", "h2", "h3", "h4", "h5", "h6",
            "table", "ul", "ol", "blockquote", "pre", "hr", "section", "article",
        }
    )  # fmt: skip
    _SKIP = frozenset({"script", "style", "head", "title"})

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._skip = 0
        self._href: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in self._SKIP:
            self._skip += 1
        elif tag in self._BLOCK:
            self.parts.append("\n")
        if tag == "li":
            self.parts.append("- ")
        if tag in ("td", "th"):
            self.parts.append("\t")
        if tag == "a":
            self._href = dict(attrs).get("href")

    def handle_endtag(self, tag: str) -> None:
        if tag in self._SKIP:
            self._skip = max(0, self._skip - 1)
        elif tag in self._BLOCK:
            self.parts.append("\n")
        if tag == "a" and self._href and not self._href.startswith("#"):
            self.parts.append(f" <{self._href}>")
            self._href = None

    def handle_data(self, data: str) -> None:
        if not self._skip:
            self.parts.append(re.sub(r"\s+", " ", data))


def html_to_text(markup: str) -> str:
    """A plain-text alternative of an HTML body."""
    parser = _TextExtractor()
    parser.feed(markup)
    parser.close()
    text = "".join(parser.parts)
    lines = [" ".join(line.split()) for line in text.splitlines()]
    text = "\n".join(lines)
    text = re.sub(r"\n{3,}", "\n\n", text).strip()
    return text + "\n"


def resolve_attachment_path(path: str, root: Path | None) -> Path:
    """The file a path attachment names, which must lie inside ``root`` (symlinks resolved)."""
    if root is None:
        raise PermanentError(
            f"attachment {path!r} refused: path attachments need MAILSENDER_ATTACHMENT_ROOT"
        )
    base = root.resolve()
    candidate = Path(path)
    target = candidate if candidate.is_absolute() else base / candidate
    try:
        resolved = target.resolve(strict=True)
    except (FileNotFoundError, NotADirectoryError):
        raise PermanentError(f"attachment {path!r} not found in the attachment root") from None
    except (OSError, RuntimeError) as exc:
        raise PermanentError(f"attachment {path!r} cannot be opened: {exc}") from None
    if not resolved.is_relative_to(base):
        raise PermanentError(f"attachment {path!r} refused: it lies outside the attachment root")
    if not resolved.is_file():
        raise PermanentError(f"attachment {path!r} is not a regular file")
    return resolved


def _attachment_bytes(
    attachment: Attachment, root: Path | None, budget: int, blobs: Mapping[str, bytes] | None
) -> tuple[str, bytes]:
    if attachment.blob is not None:
        assert attachment.filename is not None  # the model requires it with a blob
        data = (blobs or {}).get(attachment.blob)
        if data is None:
            raise PermanentError(
                f"attachment {attachment.filename!r}: its content ({attachment.blob}) is not "
                "in the result backend (expired or never stored)"
            )
        return attachment.filename, data
    if attachment.path is not None:
        path = resolve_attachment_path(attachment.path, root)
        size = path.stat().st_size
        if size > budget:
            raise PermanentError(
                f"attachment {attachment.path!r} is {size} bytes, over the message limit"
            )
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise PermanentError(
                f"attachment {attachment.path!r} cannot be read: {exc.strerror}"
            ) from None
        return attachment.filename or path.name, data
    data = attachment.decoded()
    assert attachment.filename is not None  # the model requires it for inline attachments
    return attachment.filename, data


def _set_header(msg: EmailMessage, name: str, value: str) -> None:
    try:
        check_header_text(value)
    except ValueError as exc:
        raise PermanentError(f"the {name} header {exc}; refused") from None
    msg[name] = value
    if _verbatim(SEVEN_BIT, name, value):
        return  # stored as given: printable ASCII, nothing was decoded
    parsed = str(msg[name])
    if "\r" in parsed or "\n" in parsed:
        del msg[name]
        raise PermanentError(f"the {name} header would contain a line break; refused")


def _set_addresses(msg: EmailMessage, name: str, addresses: list[Address]) -> None:
    if not addresses:
        return
    text = ", ".join(str(a) for a in addresses)
    # Short ASCII lists verbatim; the others as Address objects, which the registry encodes.
    msg[name] = text if _verbatim(SEVEN_BIT, name, text) else addresses


def build_message(
    event: MailEvent,
    instance: InstanceConfig,
    *,
    attachment_root: Path | None = None,
    max_bytes: int | None = None,
    blobs: Mapping[str, bytes] | None = None,
) -> BuiltMessage:
    """Build the message of ``event`` as sent by ``instance``; ``blobs`` holds the content of
    attachments that travel by reference (``blob`` key → bytes).

    Raises ``PermanentError`` for anything that makes the event unsendable: no recipients,
    an attachment outside the root or missing, a header that would carry a line break, or a
    message over ``max_bytes``.
    """
    limit = max_bytes or instance.max_message_bytes
    sender = parse_address_list(instance.sender)[0]
    to = _addresses(event.recipients) or _addresses(instance.recipients)
    cc = _addresses(event.cc)
    bcc = _addresses(event.bcc)
    envelope: list[str] = []
    for address in [*to, *cc, *bcc]:
        if address.addr_spec.lower() not in {a.lower() for a in envelope}:
            envelope.append(address.addr_spec)
    if not envelope:
        raise PermanentError(
            "no recipients: the event has none and the instance has no default recipients"
        )

    # Bodies are encoded 7-bit clean (quoted-printable or base64), so no server needs 8BITMIME.
    msg = EmailMessage(policy=SEVEN_BIT)
    message_id = message_id_for(event.event_id, sender.addr_spec)
    _set_header(msg, "From", str(sender))
    _set_addresses(msg, "To", to)
    _set_addresses(msg, "Cc", cc)
    if event.reply_to:
        _set_header(msg, "Reply-To", event.reply_to)
    _set_header(msg, "Subject", f"{instance.subject_prefix}{event.subject}")
    msg["Date"] = format_datetime(utc_now())
    msg["Message-ID"] = message_id
    msg["X-MailSender-Event-Id"] = event.event_id

    if event.is_html:
        msg.set_content(html_to_text(event.message), subtype="plain", cte=None)
        msg.add_alternative(event.message, subtype="html")
    else:
        msg.set_content(event.message or "\n")

    budget = limit
    bodies: list[tuple[bytes, list[bytes]]] = []
    for attachment in event.attachments:
        filename, data = _attachment_bytes(attachment, attachment_root, budget, blobs)
        budget -= len(data)
        if budget < 0:
            raise PermanentError(f"the attachments exceed the message limit of {limit} bytes")
        content_type = (
            attachment.content_type
            or mimetypes.guess_type(filename)[0]
            or "application/octet-stream"
        )
        maintype, subtype = content_type.split("/", 1)
        try:
            check_header_text(filename)
            msg.add_attachment(b"", maintype=maintype, subtype=subtype, filename=filename)
        except ValueError as exc:
            raise PermanentError(f"attachment file name {filename!r} refused: {exc}") from None
        part = _check_filename(msg, filename)
        # The body goes in after the message is written (see _splice); here a marker line.
        marker = f"MAILSENDER-BODY-{secrets.token_hex(12)}"
        part.set_payload(marker)
        bodies.append((marker.encode("ascii"), _base64_lines(data)))
        del data

    needs_utf8 = any(not a.addr_spec.isascii() for a in [sender, *to, *cc, *bcc])
    data = _splice(msg.as_bytes(policy=_SMTPUTF8 if needs_utf8 else _SMTP), bodies)
    if len(data) > limit:
        raise PermanentError(f"the message is {len(data)} bytes, over the limit of {limit} bytes")
    return BuiltMessage(
        sender=sender.addr_spec,
        recipients=envelope,
        data=data,
        message_id=message_id,
        needs_smtputf8=needs_utf8,
    )


def _check_filename(msg: EmailMessage, filename: str) -> EmailMessage:
    """The attachment's file name must come back from the built part unchanged; returns the
    part."""
    part = list(msg.iter_attachments())[-1]
    if part.get_filename() != filename:
        raise PermanentError(f"attachment file name {filename!r} cannot be encoded safely")
    assert isinstance(part, EmailMessage)
    return part


_BASE64_CHUNK = 57 * 16384
"""Bytes encoded at a time: a whole number of 76-character base64 lines (57 bytes each)."""


def _base64_lines(data: bytes) -> list[bytes]:
    """``data`` as base64 lines of 76 characters with CRLF between them, in chunks.

    The email package would keep the encoded body as one string and split it into a list of
    lines when writing, several times the attachment's size in memory at once; this keeps
    one encoded copy.
    """
    chunks = [
        base64.encodebytes(data[start : start + _BASE64_CHUNK]).replace(b"\n", b"\r\n")
        for start in range(0, len(data), _BASE64_CHUNK)
    ]
    if chunks:
        chunks[-1] = chunks[-1][:-2]  # the line break after the last line is the message's
    return chunks


def _splice(written: bytes, bodies: list[tuple[bytes, list[bytes]]]) -> bytes:
    """The written message with each attachment's marker line replaced by its body."""
    if not bodies:
        return written
    pieces: list[bytes] = []
    at = 0
    for marker, body in bodies:
        found = written.find(marker, at)
        if found < 0 or written.find(marker, found + len(marker)) >= 0:
            raise PermanentError("an attachment could not be placed in the message")
        pieces.append(written[at:found])
        pieces += body
        at = found + len(marker)
    pieces.append(written[at:])
    return b"".join(pieces)
