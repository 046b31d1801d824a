"""The published contract as AsyncAPI 3.0, generated from the msgspec message types."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from payment.devtools.asyncapi.document import (
    ASYNCAPI_VERSION,
    CONTRACT_VERSION,
    KAFKA_BINDING_VERSION,
    build_document,
)
from payment.devtools.asyncapi.headers import (
    DLQ_CARD_NUMBERS_MASKED,
    DLQ_DROPPED_HEADERS,
    DLQ_HEADERS,
    DLQ_MASKED_PARTS,
)
from payment.devtools.asyncapi.messages import DEAD_LETTER, MESSAGES, MessageSpec
from payment.devtools.asyncapi.rendering import DOCUMENT_PATH, REGENERATE, drift, render
from payment.devtools.asyncapi.rules import (
    BOOKING_ID_PATTERN,
    FAILURE_REASONS,
    OVERLAYS,
    Overlay,
    Schema,
    apply_overlay,
)

__all__ = [
    "ASYNCAPI_VERSION",
    "BOOKING_ID_PATTERN",
    "CONTRACT_VERSION",
    "DEAD_LETTER",
    "DLQ_CARD_NUMBERS_MASKED",
    "DLQ_DROPPED_HEADERS",
    "DLQ_HEADERS",
    "DLQ_MASKED_PARTS",
    "DOCUMENT_PATH",
    "FAILURE_REASONS",
    "KAFKA_BINDING_VERSION",
    "MESSAGES",
    "OVERLAYS",
    "REGENERATE",
    "MessageSpec",
    "Overlay",
    "Schema",
    "apply_overlay",
    "build_document",
    "drift",
    "main",
    "render",
]


def main(argv: Sequence[str] | None = None) -> int:
    """Write the AsyncAPI document, or with `--check` fail if the published one drifted."""
    parser = argparse.ArgumentParser(
        prog="python -m payment.devtools.asyncapi",
        description="Generate (or check) the AsyncAPI 3.0 document of the payment contract.",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="write nothing; exit 1 with a diff if the file differs from the generated one",
    )
    parser.add_argument("--output", type=Path, default=DOCUMENT_PATH, help="%(default)s")
    args = parser.parse_args(argv)
    path: Path = args.output
    document = build_document()
    if args.check:
        problem = drift(path, document)
        if problem is not None:
            print(problem, file=sys.stderr)
            return 1
        print(f"{path} is up to date")
        return 0
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render(document), encoding="utf-8")
    print(f"wrote {path}")
    return 0
