"""How a command that fails ends: one line (text or JSON) and its exit code."""

from __future__ import annotations

import json
import os
import sys
import traceback
from datetime import UTC, datetime

from payment.settings import EXIT_CONFIGURATION, Settings


def dependency_failure(exc: BaseException, settings: Settings | None) -> str | None:
    """One line for an error of the database or the broker (None: not theirs, a bug)."""
    import psycopg
    import psycopg_pool
    from aiokafka.errors import KafkaError

    from payment.adapters.startup import broker_failure, database_failure

    if settings is None:
        return None
    if isinstance(exc, psycopg.OperationalError | psycopg_pool.PoolTimeout):
        return database_failure(exc, str(settings.database_url))
    if isinstance(exc, KafkaError):
        return broker_failure(exc, str(settings.kafka_bootstrap_servers))
    return None


def fail(kind: str, line: str, code: int, exc: BaseException, settings: Settings | None) -> int:
    """Write one line (text, or JSON with PAYMENT_LOG_FORMAT=json) and return `code`.

    The traceback follows only with PAYMENT_LOG_LEVEL=DEBUG.
    """
    from payment.adapters.observability.logs import redact

    level = (settings.log_level if settings else os.environ.get("PAYMENT_LOG_LEVEL", "")).upper()
    fmt = settings.log_format if settings else os.environ.get("PAYMENT_LOG_FORMAT", "text")
    trace = "".join(traceback.format_exception(exc)) if level == "DEBUG" else None
    line = redact(line)
    if fmt == "json":
        record: dict[str, object] = {
            "time": datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": "ERROR",
            "logger": "payment.cli",
            "message": f"{kind}: {line}",
            "failure": "configuration" if code == EXIT_CONFIGURATION else "unavailable",
            "exit_code": code,
        }
        if trace is not None:
            record["exception"] = redact(trace)
        print(json.dumps(record, ensure_ascii=False), file=sys.stderr)
    else:
        print(f"payment-service: {kind}: {line}", file=sys.stderr)
        if trace is not None:
            print(redact(trace), file=sys.stderr, end="")
    return code
