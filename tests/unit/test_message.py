"""Table-driven tests of ``worker.message``: event + instance → the bytes sent and the envelope.

Every built message is read back with the standard library's parser
(``BytesParser(policy=email.policy.default)``), as a receiving client would.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

import pytest

from producer import Attachment, MailEvent
from worker.config import InstanceConfig
from worker.errors import PermanentError
from worker.message import BuiltMessage, build_message, html_to_text, message_id_for

SENDER = "Alerts <alerts@example.com>"


def instance(**params: Any) -> InstanceConfig:
    """An instance (the seed's parameter names) with ``params`` on top."""
    return InstanceConfig.model_validate(
        {"mailServer": "smtp.example.com", "sender": SENDER, **params}
    )


def mail(**fields: Any) -> MailEvent:
    """A valid event with one recipient, ``fields`` on top."""
    data: dict[str, Any] = {
        "instance": "Alerts",
        "subject": "Hello",
        "message": "Body\n",
        "recipients": "to@example.com",
        "eventId": "evt-1",
        **fields,
    }
    return MailEvent.parse(data)


def build(
    event: MailEvent | None = None, inst: InstanceConfig | None = None, **kw: Any
) -> BuiltMessage:
    return build_message(event or mail(), inst or instance(), **kw)


def parse(built: BuiltMessage) -> EmailMessage:
    message = BytesParser(policy=policy.default).parsebytes(built.data)
    assert isinstance(message, EmailMessage)
    return message


def head(built: BuiltMessage) -> bytes:
    """The header block of the raw message."""
    return built.data.split(b"\r\n\r\n", 1)[0]


# --- headers and envelope -----------------------------------------------------------------


def test_from_has_display_name_and_envelope_sender_is_the_address() -> None:
    built = build()
    (sender,) = parse(built)["From"].addresses
    assert sender.display_name == "Alerts"
    assert sender.addr_spec == "alerts@example.com"
    assert built.sender == "alerts@example.com"


def test_to_and_cc_headers() -> None:
    built = build(
        mail(
            recipients='"Doe, Jane" <jane@example.com>, bob@example.com',
            cc="Carol <carol@example.com>",
        )
    )
    msg = parse(built)
    to = [(a.display_name, a.addr_spec) for a in msg["To"].addresses]
    assert to == [("Doe, Jane", "jane@example.com"), ("", "bob@example.com")]
    cc = [(a.display_name, a.addr_spec) for a in msg["Cc"].addresses]
    assert cc == [("Carol", "carol@example.com")]


def test_bcc_is_in_the_envelope_only() -> None:
    built = build(mail(bcc="Hidden <hidden@example.com>"))
    msg = parse(built)
    assert msg["Bcc"] is None
    assert b"hidden@example.com" not in built.data
    assert b"Hidden" not in built.data
    assert "hidden@example.com" in built.recipients


def test_bcc_only_event_is_sent() -> None:
    built = build(mail(recipients="", bcc="hidden@example.com"), instance())
    assert built.recipients == ["hidden@example.com"]
    assert b"hidden@example.com" not in built.data


ENVELOPES = [
    # recipients, cc, bcc, envelope
    ("a@example.com", "", "", ["a@example.com"]),
    (
        "a@example.com",
        "b@example.com",
        "c@example.com",
        ["a@example.com", "b@example.com", "c@example.com"],
    ),
    ("a@example.com", "A@EXAMPLE.COM", "", ["a@example.com"]),
    (
        "a@example.com",
        "b@example.com",
        "a@example.com, b@example.com",
        ["a@example.com", "b@example.com"],
    ),
    ("Ann <a@example.com>, a@example.com", "", "Ann Again <a@example.com>", ["a@example.com"]),
    ('"Doe, Jane" <jane@example.com>', "", "", ["jane@example.com"]),
]


@pytest.mark.parametrize(("to", "cc", "bcc", "envelope"), ENVELOPES)
def test_envelope_is_deduplicated(to: str, cc: str, bcc: str, envelope: list[str]) -> None:
    assert build(mail(recipients=to, cc=cc, bcc=bcc)).recipients == envelope


@pytest.mark.parametrize(
    ("event_recipients", "instance_recipients", "to"),
    [
        (
            "",
            "ops@example.com, Oncall <oncall@example.com>",
            ["ops@example.com", "oncall@example.com"],
        ),
        ("a@example.com", "ops@example.com", ["a@example.com"]),
        ("", ["ops@example.com", "b@example.com"], ["ops@example.com", "b@example.com"]),
    ],
)
def test_event_recipients_override_the_instance_defaults(
    event_recipients: str, instance_recipients: str | list[str], to: list[str]
) -> None:
    built = build(mail(recipients=event_recipients), instance(recipients=instance_recipients))
    assert [a.addr_spec for a in parse(built)["To"].addresses] == to
    assert built.recipients == to


def test_no_recipients_is_permanent() -> None:
    with pytest.raises(PermanentError, match="no recipients"):
        build(mail(recipients=""), instance())


@pytest.mark.parametrize(
    ("prefix", "subject", "expected"),
    [
        ("", "Hello", "Hello"),
        ("Test - ", "Hello", "Test - Hello"),
        ("[Alerts] ", "", "[Alerts] "),
        ("Prüfung: ", "Grüezi", "Prüfung: Grüezi"),
    ],
)
def test_subject_prefix(prefix: str, subject: str, expected: str) -> None:
    msg = parse(build(mail(subject=subject), instance(subjectPrefix=prefix)))
    assert str(msg["Subject"]) == expected


def test_reply_to_header() -> None:
    msg = parse(build(mail(replyTo="Replies <r@example.com>")))
    assert [a.addr_spec for a in msg["Reply-To"].addresses] == ["r@example.com"]


@pytest.mark.parametrize(
    ("event_id", "sender", "expected"),
    [
        ("evt-1", "alerts@example.com", "<evt-1@example.com>"),
        ("order:42@shop", "alerts@example.com", "<order-42-shop@example.com>"),
        ("550e8400-e29b-41d4", "a@mail.example.org", "<550e8400-e29b-41d4@mail.example.org>"),
    ],
)
def test_message_id_for(event_id: str, sender: str, expected: str) -> None:
    assert message_id_for(event_id, sender) == expected


def test_message_id_header_is_derived_from_the_event_id() -> None:
    first = build(mail(eventId="order:42@shop"))
    again = build(mail(eventId="order:42@shop"))
    other = build(mail(eventId="evt-2"))
    assert first.message_id == again.message_id == "<order-42-shop@example.com>"
    assert other.message_id != first.message_id
    msg = parse(first)
    assert msg["Message-ID"] == first.message_id
    assert msg["X-MailSender-Event-Id"] == "order:42@shop"


def test_date_is_present_and_now() -> None:
    before = datetime.now(UTC) - timedelta(seconds=2)
    date = parsedate_to_datetime(str(parse(build())["Date"]))
    after = datetime.now(UTC) + timedelta(seconds=2)
    assert date.tzinfo is not None
    assert before <= date <= after


def test_headers_appear_once() -> None:
    msg = parse(build(mail(cc="c@example.com", replyTo="r@example.com")))
    for name in ("From", "To", "Cc", "Reply-To", "Subject", "Date", "Message-ID", "MIME-Version"):
        assert len(msg.get_all(name) or []) == 1, name


# --- non-ASCII ----------------------------------------------------------------------------


def test_non_ascii_round_trip() -> None:
    built = build(
        mail(
            subject="Grüezi ✓ — 日本語の件名 that is long enough to be folded over more lines",
            message="Grüße aus Zürich ✓\n",
            recipients='Jörg Müller <joerg@example.com>, "Doe, Jäne" <jane@example.com>',
            cc="Łukasz <lukasz@example.com>",
        ),
        instance(sender="Zürich Ålerts <alerts@example.com>"),
    )
    assert head(built).isascii()  # ASCII addresses: encoded words, no SMTPUTF8 needed
    assert not built.needs_smtputf8
    msg = parse(built)
    assert str(msg["Subject"]) == (
        "Grüezi ✓ — 日本語の件名 that is long enough to be folded over more lines"
    )
    assert msg["From"].addresses[0].display_name == "Zürich Ålerts"
    assert [a.display_name for a in msg["To"].addresses] == ["Jörg Müller", "Doe, Jäne"]
    assert msg["Cc"].addresses[0].display_name == "Łukasz"
    body = msg.get_body(("plain",))
    assert body is not None
    assert body.get_content().replace("\r\n", "\n") == "Grüße aus Zürich ✓\n"


@pytest.mark.parametrize(
    "fields",
    [
        {"message": "Grüße aus Zürich ✓\n"},
        {"message": "<p>Grüße ✓</p>", "isHtml": True},
        {"message": "x" * 2000 + "\n"},
    ],
)
def test_message_with_ascii_addresses_is_7bit_clean(fields: dict[str, Any]) -> None:
    # The transport declares BODY=8BITMIME only together with SMTPUTF8 (worker/smtp.py), so
    # any other message must be 7-bit data with lines of at most 998 octets (RFC 5321).
    built = build(mail(**fields))
    assert not built.needs_smtputf8
    assert built.data.isascii()
    assert max(len(line) for line in built.data.split(b"\r\n")) <= 998
    body = parse(built).get_body(("plain",))
    assert body is not None
    assert "\n" in body.get_content()


def test_lines_end_with_crlf() -> None:
    data = build(mail(message="one\ntwo\n")).data
    assert b"\n" not in data.replace(b"\r\n", b"")


def test_non_ascii_address_needs_smtputf8() -> None:
    built = build(mail(recipients="jörg@exämple.com"))
    assert built.needs_smtputf8
    assert built.recipients == ["jörg@exämple.com"]
    assert "To: jörg@exämple.com\r\n".encode() in head(built)


# --- HTML ---------------------------------------------------------------------------------


HTML = (
    "<html><head><title>T</title><style>p {color: red}</style></head><body>"
    "<h1>Report</h1><p>Hello <b>World</b> &amp; friends</p>"
    '<ul><li>one</li><li>two</li></ul><p><a href="https://example.com/r/1">details</a></p>'
    "</body></html>"
)


def test_html_is_multipart_alternative_with_a_text_part() -> None:
    msg = parse(build(mail(message=HTML, isHtml=True)))
    assert msg.get_content_type() == "multipart/alternative"
    plain = msg.get_body(("plain",))
    rich = msg.get_body(("html",))
    assert plain is not None and rich is not None
    assert rich.get_content().replace("\r\n", "\n").rstrip("\n") == HTML
    text = plain.get_content().replace("\r\n", "\n")
    assert text == html_to_text(HTML)
    assert "<" not in text.replace("<https://example.com/r/1>", "")
    for words in ("Report", "Hello World & friends", "one", "two", "https://example.com/r/1"):
        assert words in text
    assert "color" not in text
    assert "T\n" not in text


def test_plain_text_is_a_single_part() -> None:
    msg = parse(build(mail(message="Just text\n")))
    assert msg.get_content_type() == "text/plain"
    assert msg.get_content().replace("\r\n", "\n") == "Just text\n"


HTML_TO_TEXT = [
    # markup, expected text
    ("<p>Hello</p><p>World</p>", "Hello\n\nWorld\n"),
    ("Hello<br>World", "Hello\nWorld\n"),
    ("Hello <b>bold</b> <i>world</i>", "Hello bold world\n"),
    ("<p>a    b\n  c</p>", "a b c\n"),
    ('<a href="https://example.com/x">site</a>', "site <https://example.com/x>\n"),
    ('<a href="#top">top</a>', "top\n"),
    ("<style>p{color:red}</style><p>Hi</p>", "Hi\n"),
    ("<script>alert(1)</script>Hi", "Hi\n"),
    ("<html><head><title>T</title></head><body>Body</body></html>", "Body\n"),
    ("Fish &amp; Chips &lt;3", "Fish & Chips <3\n"),
    ("caf&eacute; &#8364;5", "café €5\n"),
    # Text that shows markup literally must stay literal: decoded once, not twice.
    ("<p>Write &amp;lt;b&amp;gt; for bold</p>", "Write &lt;b&gt; for bold\n"),
]


@pytest.mark.parametrize(("markup", "expected"), HTML_TO_TEXT)
def test_html_to_text(markup: str, expected: str) -> None:
    assert html_to_text(markup) == expected


def test_html_to_text_list_items_are_on_their_own_lines() -> None:
    lines = [
        line for line in html_to_text("<ul><li>one</li><li>two</li></ul>").splitlines() if line
    ]
    assert lines == ["- one", "- two"]


def test_html_to_text_keeps_table_cells_apart() -> None:
    text = html_to_text(
        "<table><tr><th>Host</th><th>State</th></tr><tr><td>db1</td><td>down</td></tr></table>"
    )
    lines = [line.split() for line in text.splitlines() if line.strip()]
    assert lines == [["Host", "State"], ["db1", "down"]]


# --- attachments --------------------------------------------------------------------------


ATTACHMENTS = [
    # file name, bytes, contentType given, content type expected
    ("report.pdf", b"%PDF-1.4\n\x00\xff\xfe binary", None, "application/pdf"),
    ("notes.txt", "Grüße, café, naïve\n".encode("latin-1"), None, "text/plain"),
    ("data.csv", "a;b\r\nü;ß\nlone\rcr".encode("latin-1"), "text/csv", "text/csv"),
    ("Übersicht März 2024.pdf", b"%PDF-1.7", None, "application/pdf"),
    ("日本語のファイル.txt", "テキスト".encode(), None, "text/plain"),
    ("a very long file name " + "x" * 120 + ".txt", b"long", None, "text/plain"),
    ('quote"and;semi.txt', b"q", None, "text/plain"),
    ("image.png", b"\x89PNG\r\n\x1a\n\x00\x00", None, "image/png"),
    ("archive.zip", b"PK\x03\x04", None, "application/zip"),
    ("noext", b"\x00\x01\x02", None, "application/octet-stream"),
    ("custom.pdf", b"x", "application/x-custom", "application/x-custom"),
    ("empty.txt", b"", None, "text/plain"),
    ("all-bytes.bin", bytes(range(256)) * 4, None, "application/octet-stream"),
]


@pytest.mark.parametrize(("filename", "data", "given", "content_type"), ATTACHMENTS)
def test_inline_attachments_are_byte_identical(
    filename: str, data: bytes, given: str | None, content_type: str
) -> None:
    event = mail(attachments=[Attachment.inline(filename, data, given).to_json()])
    msg = parse(build(event))
    (part,) = list(msg.iter_attachments())
    assert part.get_filename() == filename
    assert part.get_content_disposition() == "attachment"
    assert part.get_content_type() == content_type
    assert part.get_payload(decode=True) == data


def test_several_attachments_keep_their_order() -> None:
    names_ = ["b.txt", "a.pdf", "c.png"]
    event = mail(attachments=[Attachment.inline(n, n.encode()).to_json() for n in names_])
    parts = list(parse(build(event)).iter_attachments())
    assert [p.get_filename() for p in parts] == names_
    assert [p.get_payload(decode=True) for p in parts] == [n.encode() for n in names_]


def test_html_with_attachments() -> None:
    event = mail(
        message="<p>Hi</p>", isHtml=True, attachments=[Attachment.inline("a.txt", b"x").to_json()]
    )
    msg = parse(build(event))
    assert msg.get_content_type() == "multipart/mixed"
    assert msg.get_body(("html",)) is not None
    assert msg.get_body(("plain",)) is not None
    assert [p.get_filename() for p in msg.iter_attachments()] == ["a.txt"]


# --- path attachments ---------------------------------------------------------------------


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """An attachment root with files, and things around it that must stay out of reach.

    root/report.pdf, root/sub/data.csv, root/inner-link.pdf -> report.pdf (inside),
    root/escape.txt -> ../secret.txt, root/escape-dir -> .. (outside), tmp/secret.txt.
    """
    base = tmp_path / "root"
    (base / "sub").mkdir(parents=True)
    (base / "report.pdf").write_bytes(b"%PDF report")
    (base / "sub" / "data.csv").write_bytes("ü;ß\r\n".encode("latin-1"))
    (base / "Grüße.txt").write_bytes(b"hi")
    (tmp_path / "secret.txt").write_bytes(b"secret")
    (base / "inner-link.pdf").symlink_to(base / "report.pdf")
    (base / "escape.txt").symlink_to(tmp_path / "secret.txt")
    (base / "escape-dir").symlink_to(tmp_path, target_is_directory=True)
    return base


def _path_event(path: str, **extra: Any) -> MailEvent:
    return mail(attachments=[{"path": path, **extra}])


@pytest.mark.parametrize(
    ("path", "filename", "data"),
    [
        ("report.pdf", "report.pdf", b"%PDF report"),
        ("sub/data.csv", "data.csv", "ü;ß\r\n".encode("latin-1")),
        ("./sub/../report.pdf", "report.pdf", b"%PDF report"),
        ("inner-link.pdf", "report.pdf", b"%PDF report"),
        ("Grüße.txt", "Grüße.txt", b"hi"),
        ("{root}/report.pdf", "report.pdf", b"%PDF report"),
    ],
)
def test_path_attachments_inside_the_root(
    root: Path, path: str, filename: str, data: bytes
) -> None:
    built = build(_path_event(path.format(root=root)), attachment_root=root)
    (part,) = list(parse(built).iter_attachments())
    assert part.get_filename() == filename
    assert part.get_payload(decode=True) == data


def test_path_attachment_with_a_file_name(root: Path) -> None:
    built = build(_path_event("sub/data.csv", filename="export.csv"), attachment_root=root)
    (part,) = list(parse(built).iter_attachments())
    assert part.get_filename() == "export.csv"
    assert part.get_content_type() == "text/csv"


def test_path_attachments_as_one_string(root: Path) -> None:
    built = build(mail(attachments="report.pdf; sub/data.csv"), attachment_root=root)
    assert [p.get_filename() for p in parse(built).iter_attachments()] == ["report.pdf", "data.csv"]


def test_root_given_through_a_symlink(root: Path, tmp_path: Path) -> None:
    link = tmp_path / "root-link"
    link.symlink_to(root, target_is_directory=True)
    built = build(_path_event(f"{link}/report.pdf"), attachment_root=link)
    assert [p.get_filename() for p in parse(built).iter_attachments()] == ["report.pdf"]


REFUSED = [
    # path ({root} and {tmp} are filled in), text the error must contain
    ("../secret.txt", "outside"),
    ("sub/../../secret.txt", "outside"),
    ("{tmp}/secret.txt", "outside"),
    ("/etc/passwd", "outside"),
    ("{root}/../secret.txt", "outside"),
    ("escape.txt", "outside"),
    ("escape-dir/secret.txt", "outside"),
    ("missing.pdf", "not found"),
    ("../missing.pdf", ""),
    ("sub", "not a regular file"),
    ("report.pdf/x", ""),
]


@pytest.mark.parametrize(("path", "text"), REFUSED)
def test_path_attachments_outside_the_root_are_refused(
    root: Path, tmp_path: Path, path: str, text: str
) -> None:
    path = path.format(root=root, tmp=tmp_path)
    with pytest.raises(PermanentError) as info:
        build(_path_event(path), attachment_root=root)
    assert path in str(info.value)
    assert text in str(info.value)


def test_path_attachments_without_a_root_are_refused(root: Path) -> None:
    with pytest.raises(PermanentError, match="MAILSENDER_ATTACHMENT_ROOT"):
        build(_path_event(str(root / "report.pdf")), attachment_root=None)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads every file")
def test_unreadable_path_attachment_is_permanent(root: Path) -> None:
    locked = root / "locked.pdf"
    locked.write_bytes(b"x")
    locked.chmod(0)
    with pytest.raises(PermanentError, match=r"locked\.pdf"):
        build(_path_event("locked.pdf"), attachment_root=root)


# --- size limit ---------------------------------------------------------------------------


def test_message_at_the_limit_is_built_and_one_byte_less_is_refused() -> None:
    size = len(build().data)
    assert len(build(max_bytes=size).data) == size
    with pytest.raises(PermanentError, match="limit"):
        build(max_bytes=size - 1)


def test_instance_limit_applies() -> None:
    event = mail(attachments=[Attachment.inline("big.bin", b"x" * 5000).to_json()])
    with pytest.raises(PermanentError, match="limit"):
        build(event, instance(maxMessageBytes=4000))
    assert build(event, instance(maxMessageBytes=20000)).data


def test_large_path_attachment_is_refused_before_it_is_read(root: Path) -> None:
    (root / "big.bin").write_bytes(b"x" * 10000)
    with pytest.raises(PermanentError, match=r"big\.bin"):
        build(_path_event("big.bin"), attachment_root=root, max_bytes=5000)


def test_attachments_together_over_the_limit_are_refused() -> None:
    parts = [Attachment.inline(f"{i}.bin", b"x" * 3000).to_json() for i in range(3)]
    with pytest.raises(PermanentError, match="limit"):
        build(mail(attachments=parts), max_bytes=8000)


# --- header safety at build time ----------------------------------------------------------


@pytest.mark.parametrize(
    "subject",
    ["a\r\nBcc: x@evil.example", "a\nBcc: x@evil.example", "=?UTF-8?Q?a=0ABcc:_x@evil.example?="],
)
def test_line_break_reaching_the_builder_is_permanent(subject: str) -> None:
    # An event that skipped validation (model_construct): the builder is the last line of
    # defence and must refuse with PermanentError, as its docstring says.
    unchecked = mail().model_copy(update={"subject": subject})
    with pytest.raises(PermanentError):
        build(unchecked)


# -- headers kept verbatim are the bytes the header registry would write ----------------------

VERBATIM_CASES = [
    ("Subject", "Quarterly report"),
    ("Subject", '  two  spaces  and (parens) <angles> "quotes" ;:,'),
    ("Subject", "x" * 60),
    ("To", '"Doe, Jane" <jane@example.com>, bob@example.org'),
    ("From", "Alerts <alerts@example.com>"),
    ("Reply-To", "replies@example.com"),
    ("Message-ID", "<evt-1@example.com>"),
]


@pytest.mark.parametrize(("name", "value"), VERBATIM_CASES)
def test_a_verbatim_header_is_written_as_the_registry_would(name: str, value: str) -> None:
    from worker.message import SEVEN_BIT, _verbatim

    assert _verbatim(SEVEN_BIT, name, value)
    fast, full = EmailMessage(policy=SEVEN_BIT), EmailMessage(policy=policy.default)
    fast[name] = value
    full[name] = value
    assert fast.as_bytes(policy=policy.SMTP) == full.as_bytes(policy=policy.SMTP)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("Subject", "Grüße"),  # non-ASCII: RFC 2047
        ("Subject", "y" * 80),  # long: folded
        ("Subject", "=?UTF-8?Q?hi?="),  # an encoded word: the registry decides
        ("Subject", "tab\there"),  # a control character
        ("Content-Type", "text/plain"),  # MIME headers are read back as objects
    ],
)
def test_other_header_values_go_through_the_registry(name: str, value: str) -> None:
    from worker.message import SEVEN_BIT, _verbatim

    assert not _verbatim(SEVEN_BIT, name, value)


def test_a_long_recipient_list_is_still_folded_and_parses_back() -> None:
    names = [f'"Person {i}, Department {i}" <p{i}@example.com>' for i in range(6)]
    message = parse(build(mail(recipients=", ".join(names))))
    assert [a.display_name for a in message["to"].addresses] == [
        f"Person {i}, Department {i}" for i in range(6)
    ]
    assert all(
        len(line) <= 78 for line in head(build(mail(recipients=", ".join(names)))).split(b"\r\n")
    )
