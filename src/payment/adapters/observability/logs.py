"""Log lines: readable text or JSON, with trace and span ids, and secrets redacted on the way out.

`configure_logging` installs one handler on the root logger with `RedactingFilter` on it,
so every record that reaches the output, from any logger, passes the filter first. The
filter works on the *rendered* text: the message with its arguments substituted, the
exception and stack text, and every `extra` field, so a secret is caught whichever way it
reached the record (a format argument, an exception message, a traceback line).

What is redacted: Stripe keys (`sk_live_…`, `sk_test_…`, `rk_…`, `whsec_…`), passwords in
URLs, `Authorization` values and bearer/basic credentials, `password=`/`api_key=`-style
pairs, and any run of digits that contains a card number (the rule of
`payment.application.validation.looks_like_card_number`: 13-19 digits, Luhn-valid, spaces
and dashes allowed). UUIDs are left alone: payment ids are what operators search for.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import traceback
from datetime import UTC, datetime
from typing import Any, Final, TextIO

from payment.adapters.observability.telemetry import current_ids
from payment.application.validation import (
    looks_like_card_number,
    mask_card_numbers,
    might_hold_card_number,
)
from payment.domain.redaction import REDACTED, REDACTED_CARD

_SECRETS: Final = (
    # Stripe secret, restricted, publishable and webhook keys.
    (re.compile(r"\b(?:sk|rk|pk)_(?:live|test)_[0-9A-Za-z]{6,}"), REDACTED),
    (re.compile(r"\bwhsec_[0-9A-Za-z]{6,}"), REDACTED),
    # A password in a URL: scheme://user:password@host
    (re.compile(r"(://[^/\s:@]*:)[^@\s/]+@"), rf"\1{REDACTED}@"),
    # Bearer/basic credentials anywhere, then whatever follows an Authorization header.
    (re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=-]{4,}"), rf"\1 {REDACTED}"),
    (
        re.compile(r"(?i)(\bauthorization[\"']?\s*[:=]\s*[\"']?)(?!\s*\[REDACTED)[^\"'\r\n,;}]+"),
        rf"\1{REDACTED}",
    ),
    (
        re.compile(
            r"(?i)(\b(?:password|passwd|pwd|secret|api[_-]?key|access[_-]?token|client[_-]?secret)"
            r"[\"']?\s*[:=]\s*[\"']?)[^\s\"',;&}]+"
        ),
        rf"\1{REDACTED}",
    ),
)
# Every secret pattern above starts with one of these: most lines contain none, and one
# search for them is far cheaper than running each pattern.
_SECRET_HINT: Final = re.compile(
    r"(?i)[srp]k_|whsec_|://|bearer|basic|authoriz|passw|pwd|secret|api[_-]?key|access[_-]?token"
)


def redact(text: str) -> str:
    """`text` with secrets and card numbers replaced (UUIDs kept as they are).

    Card numbers by the validation rule itself (`mask_card_numbers`: digit groups joined
    by spaces or dashes, JSON `\\u` escapes included), with the same marker.
    """
    if _SECRET_HINT.search(text) is not None:
        for pattern, replacement in _SECRETS:
            text = pattern.sub(replacement, text)
    if not might_hold_card_number(text):
        return text
    return mask_card_numbers(text)


# Attributes every LogRecord has; anything else on a record came from `extra=`.
_STANDARD_ATTRIBUTES: Final = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
    "message",
    "asctime",
    "taskName",
    "trace_id",
    "span_id",
}


def extra_fields(record: logging.LogRecord) -> dict[str, Any]:
    """The `extra=` fields of a record, in the order they were given."""
    return {k: v for k, v in vars(record).items() if k not in _STANDARD_ATTRIBUTES}


def _redact_value(value: Any) -> Any:
    if value is None or isinstance(value, bool | float):
        return value
    if isinstance(value, int):
        # 13 digits at least before it can be a card number.
        if abs(value) < 10**12:
            return value
        return REDACTED_CARD if looks_like_card_number(str(value)) else value
    return redact(value if isinstance(value, str) else str(value))


class RedactingFilter(logging.Filter):
    """Redacts a record in place: message and arguments, exception and stack text, extras.

    The message is rendered once here (arguments substituted) and the record keeps only
    the redacted result; the exception becomes its redacted text (`exc_text`), so no
    formatter downstream can render the original again.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except (TypeError, ValueError, KeyError):
            message = f"{record.msg} {record.args!r}"
        record.msg = redact(message)
        record.args = None
        if record.exc_info:
            if not record.exc_text:
                record.exc_text = "".join(traceback.format_exception(*record.exc_info)).rstrip()
            record.exc_info = None
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        for key, value in extra_fields(record).items():
            setattr(record, key, _redact_value(value))
        return True


def _trace_ids(record: logging.LogRecord) -> tuple[str, str] | None:
    # A handler formats the record in the task that logged it, so the current span is
    # the one the line belongs to (unless the caller named the ids explicitly).
    trace_id, span_id = getattr(record, "trace_id", None), getattr(record, "span_id", None)
    if isinstance(trace_id, str) and isinstance(span_id, str):
        return trace_id, span_id
    return current_ids()


class TextFormatter(logging.Formatter):
    """`time LEVEL logger: message key=value … trace_id=… span_id=…`, then any traceback."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        record.message = record.getMessage()
        record.asctime = self.formatTime(record, self.datefmt)
        line = self.formatMessage(record)
        fields = [f"{k}={_text_value(v)}" for k, v in extra_fields(record).items() if v is not None]
        ids = _trace_ids(record)
        if ids is not None:
            fields += [f"trace_id={ids[0]}", f"span_id={ids[1]}"]
        if fields:
            line += " " + " ".join(fields)
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            line += "\n" + record.exc_text
        if record.stack_info:
            line += "\n" + self.formatStack(record.stack_info)
        return line


def _text_value(value: Any) -> str:
    text = str(value)
    return json.dumps(text) if (not text or any(c.isspace() or c == '"' for c in text)) else text


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, trace ids, extras, exception."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        ids = _trace_ids(record)
        if ids is not None:
            entry["trace_id"], entry["span_id"] = ids
        for key, value in extra_fields(record).items():
            entry.setdefault(key, value)
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack"] = record.stack_info
        return json.dumps(entry, default=str, ensure_ascii=False)


_HANDLER_NAME: Final = "payment-service"


def build_handler(fmt: str = "text", stream: TextIO | None = None) -> logging.Handler:
    """A stream handler writing `fmt` (`text` or `json`) lines through the redacting filter."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(RedactingFilter())
    return handler


def configure_logging(
    level: str = "INFO", fmt: str = "text", stream: TextIO | None = None
) -> logging.Handler:
    """Install (or replace) the service's handler on the root logger; returns it.

    The redacting filter sits on the handler, so it sees every record that is written,
    whichever logger it came from.
    """
    handler = build_handler(fmt, stream)
    root = logging.getLogger()
    for old in list(root.handlers):
        if old.get_name() == _HANDLER_NAME:
            root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # aiokafka is chatty about every reconnect; its warnings are enough.
    logging.getLogger("aiokafka").setLevel(logging.WARNING)
    return handler
