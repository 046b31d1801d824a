"""The database connection at start-up: is it encrypted and verified, and if it fails, why."""

from __future__ import annotations

import asyncio
import ipaddress
import os
import re

import psycopg
from psycopg.conninfo import conninfo_to_dict

# libpq modes that may talk to the server in the clear (`prefer` is libpq's default).
_UNENCRYPTED_MODES = frozenset({"disable", "allow", "prefer"})


class DatabaseRejected(Exception):
    """The server answered but refused the connection settings; the message names what to
    fix in PAYMENT_DATABASE_URL and never quotes the URL or a password."""


class DatabaseUnreachable(Exception):
    """The server did not answer (refused, timed out, name not found)."""


def _is_loopback(host: str) -> bool:
    if host == "" or host.startswith("/") or host.startswith("@") or host == "localhost":
        return True  # a Unix socket, or this machine
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def unencrypted_remote_hosts(url: str) -> tuple[list[str], str]:
    """The non-loopback hosts of `url` that libpq may reach without TLS, and the sslmode.

    Empty when every host is loopback (or a socket) or sslmode is require, verify-ca or
    verify-full. PGSSLMODE and PGHOST count, as libpq reads them.
    """
    params = conninfo_to_dict(url)
    mode = str(params.get("sslmode") or os.environ.get("PGSSLMODE") or "prefer")
    if mode not in _UNENCRYPTED_MODES:
        return [], mode
    hosts = str(params.get("host") or os.environ.get("PGHOST") or "").split(",")
    return [h for h in hosts if not _is_loopback(h.strip())], mode


# libpq's texts, matched to say which part of the URL to fix (never echoed).
_REJECTIONS: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(pattern, re.IGNORECASE), advice)
    for pattern, advice in (
        (
            r"password authentication failed|password is required|no password supplied",
            "the server refused the user's password",
        ),
        (
            r"does not match host name",
            "the server's certificate does not name this host; connect by a name it holds",
        ),
        (
            r"certificate verify failed|self[- ]signed certificate|unable to get local issuer",
            "the server's certificate is not signed by a CA in sslrootcert",
        ),
        (
            r"root certificate file .* does not exist|could not read root certificate",
            "sslrootcert names no readable CA file",
        ),
        (r"no pg_hba\.conf entry", "the server refuses this user, database or encryption"),
        (r"server does not support SSL", "the server offers no TLS, but sslmode requires it"),
        (r"database .* does not exist", "no such database"),
        (r"role .* does not exist", "no such user"),
        (r"invalid sslmode|invalid connection option|invalid URI", "malformed connection options"),
    )
)


def classify(exc: psycopg.Error) -> DatabaseRejected | DatabaseUnreachable:
    """What a failed first connection means, as an error fit for one log line."""
    text = str(exc)
    for pattern, advice in _REJECTIONS:
        if pattern.search(text):
            return DatabaseRejected(advice)
    return DatabaseUnreachable(f"no answer ({type(exc).__name__})")


async def check_database(url: str, *, timeout_s: float = 10.0) -> None:
    """Open and close one connection; raise `DatabaseRejected` or `DatabaseUnreachable`."""
    try:
        async with asyncio.timeout(timeout_s):
            conn = await psycopg.AsyncConnection.connect(
                url, connect_timeout=max(2, int(timeout_s))
            )
    except psycopg.Error as exc:
        raise classify(exc) from None
    except TimeoutError:
        raise DatabaseUnreachable(f"no answer within {timeout_s:g} s") from None
    await conn.close()
