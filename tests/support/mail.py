"""Reading received mails the way the handed cases say: decode, CRLF → LF, one trailing LF off."""

from __future__ import annotations

import hashlib
from email.message import EmailMessage, Message


def normalised(text: str) -> str:
    """CRLF to LF, and at most one trailing LF removed."""
    return text.replace("\r\n", "\n").removesuffix("\n")


def body_text(msg: EmailMessage, subtype: str = "plain") -> str:
    """The decoded text body of ``subtype``, normalised."""
    part = msg.get_body((subtype,))
    assert part is not None, f"no text/{subtype} part"
    content = part.get_content()
    assert isinstance(content, str)
    return normalised(content)


def attachments_sha256(msg: EmailMessage) -> dict[str, str]:
    """File name → SHA-256 of the decoded attachment bytes."""
    out: dict[str, str] = {}
    for part in msg.iter_attachments():
        assert isinstance(part, Message)
        payload = part.get_payload(decode=True)
        assert isinstance(payload, bytes)
        out[str(part.get_filename())] = hashlib.sha256(payload).hexdigest()
    return out
