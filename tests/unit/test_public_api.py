"""The producer's public API is pinned, and the producer never imports the worker."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import producer

PUBLIC = [
    "Attachment",
    "EnqueueFailed",
    "InstanceEvent",
    "InvalidEvent",
    "MailDeliveryDeferred",
    "MailDeliveryFailed",
    "MailEvent",
    "MailProducer",
    "MailSenderError",
    "ProducerConfigError",
    "Receipt",
    "Transaction",
]

PRODUCER_DIR = Path(producer.__file__).parent


def test_all_is_pinned_and_sorted() -> None:
    assert producer.__all__ == PUBLIC
    assert producer.__all__ == sorted(producer.__all__)


def test_every_public_name_exists_and_is_documented() -> None:
    for name in producer.__all__:
        obj = getattr(producer, name)
        assert obj.__doc__, name


def test_contract_imports() -> None:
    from producer import MailDeliveryFailed, MailEvent, MailProducer, Transaction

    assert MailDeliveryFailed.__module__ == "producer"  # Celery rebuilds it by this name
    assert {MailEvent, MailProducer, Transaction}


def test_producer_package_has_py_typed() -> None:
    assert (PRODUCER_DIR / "py.typed").is_file()


def test_producer_sources_never_import_worker() -> None:
    offenders = []
    for path in sorted(PRODUCER_DIR.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                modules = [node.module or ""]
            else:
                continue
            offenders += [
                f"{path.name}:{node.lineno} {m}"
                for m in modules
                if m == "worker" or m.startswith("worker.")
            ]
    assert offenders == []


def test_importing_producer_loads_no_worker_module() -> None:
    code = (
        "import sys, producer, producer.client, producer.models, producer.errors, "
        "producer.names\n"
        "loaded = sorted(m for m in sys.modules if m == 'worker' or m.startswith('worker.'))\n"
        "print(','.join(loaded))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.strip() == ""
