"""One line per start-up failure: what failed and what to check, never a secret.

The database's and the broker's client errors are long, multi-line and sometimes quote a
connection string. At start-up an operator needs one line that names the dependency, the
address (without a password) and the likely cause; these functions write it.
"""

from __future__ import annotations

import re

from aiokafka import errors as kafka_errors
from psycopg import conninfo

_AUTH = re.compile(r"password authentication failed|role \"[^\"]*\" does not exist|no pg_hba")
_NO_DATABASE = re.compile(r"database \"([^\"]*)\" does not exist")
_RESOLVE = re.compile(r"failed to resolve host|could not translate host name")
_REFUSED = re.compile(r"Connection refused|No such file or directory")
_TLS = re.compile(r"SSL|certificate", re.IGNORECASE)


def database_address(url: str) -> str:
    """`user@host:port/dbname` of a PostgreSQL URL, without its password."""
    try:
        parts = conninfo.conninfo_to_dict(url)
    except Exception:  # a malformed URL was refused by the settings already
        return "PAYMENT_DATABASE_URL"
    user = parts.get("user")
    where = f"{parts.get('host', 'localhost')}:{parts.get('port', 5432)}/{parts.get('dbname', '')}"
    return f"{user}@{where}" if user else where


def database_failure(exc: BaseException, url: str) -> str:
    """Why PostgreSQL at `url` could not be used, in one line (exit code 3)."""
    address = database_address(url)
    text = str(exc)
    sqlstate = getattr(exc, "sqlstate", None) or ""
    if isinstance(exc, TimeoutError) or "timeout expired" in text:
        return (
            f"database {address}: no answer in time: check the host, the port and any firewall"
            " between this instance and PostgreSQL (PAYMENT_DATABASE_URL)"
        )
    if _AUTH.search(text) or sqlstate.startswith("28"):
        return (
            f"database {address}: credentials refused: check the user and password in"
            " PAYMENT_DATABASE_URL, and pg_hba.conf"
        )
    if match := _NO_DATABASE.search(text):
        return (
            f"database {address}: database {match.group(1)!r} does not exist: create it, or"
            " fix the name in PAYMENT_DATABASE_URL"
        )
    if _RESOLVE.search(text):
        return f"database {address}: host name not found: check the host in PAYMENT_DATABASE_URL"
    if _REFUSED.search(text):
        return (
            f"database {address}: connection refused: check that PostgreSQL runs there and"
            " accepts TCP connections (PAYMENT_DATABASE_URL)"
        )
    if sqlstate == "42501":
        return (
            f"database {address}: permission denied ({type(exc).__name__}): the runtime role"
            " cannot change the schema; run `payment-service migrate` as the migrator role"
            " (docs/operations.md, Database roles)"
        )
    if _TLS.search(text):
        return f"database {address}: TLS handshake failed: check the server's certificate"
    what = f"{type(exc).__name__} {sqlstate}".strip()
    return (
        f"database {address}: unavailable ({what}):"
        " check that PostgreSQL runs and accepts connections (PAYMENT_DATABASE_URL)"
    )


def broker_failure(exc: BaseException, servers: str) -> str:
    """Why the Kafka cluster at `servers` could not be used, in one line (exit code 3)."""
    name = type(exc).__name__
    if name.endswith("AuthorizationFailedError"):  # topic, group, cluster, transactional id
        return (
            f"Kafka {servers}: not authorized ({name}): grant the service's principal the ACLs"
            " of docs/operations.md (Kafka ACLs)"
        )
    if isinstance(exc, kafka_errors.KafkaConnectionError | ConnectionError | OSError):
        return (
            f"Kafka {servers}: cannot connect ({name}): check that the brokers run and that"
            " PAYMENT_KAFKA_BOOTSTRAP_SERVERS names their listeners"
        )
    if isinstance(exc, TimeoutError | kafka_errors.KafkaTimeoutError):
        return (
            f"Kafka {servers}: no answer in time ({name}): check the brokers, their listeners"
            " (advertised.listeners) and any firewall (PAYMENT_KAFKA_BOOTSTRAP_SERVERS)"
        )
    return (
        f"Kafka {servers}: unavailable ({name}): check the brokers"
        " (PAYMENT_KAFKA_BOOTSTRAP_SERVERS)"
    )
