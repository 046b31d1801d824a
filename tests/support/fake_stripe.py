"""A Stripe-shaped gateway of our own, in a child process: the ledger outlives the service.

Why not localstripe for the crash tests: it ignores idempotency keys and has no search, so
the adapter must scan every PaymentIntent before each charge (localstripe's list costs
grow with its whole store: over a second per charge at a few hundred payments on a small
machine). Chaos runs need hundreds of payments in minutes. This server speaks the small
part of Stripe's API the `StripeProcessor` uses in its `stripe` dialect, with Stripe's
semantics where they matter for "never charge twice":

- `POST /v1/payment_intents` (form-encoded, `confirm=true`) with an `Idempotency-Key`:
  the first request with a key executes and its answer is stored; a later request with
  the same key and the same parameters gets that answer again (`Idempotent-Replayed:
  true`), with other parameters a 400 `idempotency_error`; while the first is still
  executing, a 409 (as Stripe answers for concurrent requests with one key).
- `pm_card_visa` (any payment method not in `DECLINING_METHODS`) succeeds; a declining
  method leaves the intent in `requires_payment_method` with `last_payment_error`, and
  answers 402 `card_error`, as Stripe does.
- `GET /v1/payment_intents/search?query=metadata['payment_id']:'…'` and
  `GET /v1/payment_intents` (list, oldest first, `limit` / `starting_after`).
- `POST /v1/refunds` (`payment_intent`, `amount`, `metadata[...]`) with the same
  idempotency-key semantics; a refund past what is left of the intent is a 400
  `amount_too_large`, as Stripe answers. `GET /v1/refunds?payment_intent=…` lists them.
- `GET /_ledger`: every intent, every refund and the counters, for the tests' oracle.

Faults, for the reconciler to earn its keep: `--lose-response-rate P` executes a charge
and then drops the connection without answering (the caller cannot know it charged), and
`--latency-ms MIN:MAX` holds each charge that long (`--lookup-latency-ms` each search).

Brownouts (issue 13), switched at run time with `POST /_control` (`FakeStripe.control`):
`stall` accepts every API request and answers none until switched off (a charge is
executed first, for one request in two: the caller cannot know which), then drops the
connections; `rate_limit` (requests per second, 0: none) answers 429 `rate_limit` with
`Retry-After: retry_after_s` beyond it, as Stripe does; `fail_with_500` answers new
charges 500 without charging and, like Stripe, replays that 500 to every later request
with the same key (`Idempotent-Replayed: true`). The counters include
`in_flight_max`, the most API requests the gateway held at once (a request whose caller
hung up no longer counts), and `rate_limited`.

Run as a script (stdlib only); `FakeStripe` starts and stops it on a free port.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import re
import select
import socket
import sys
import threading
import time
import uuid
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

API_KEY = "sk_test_fake_gateway"
DECLINING_METHODS = {
    "pm_card_chargeCustomerFail": ("card_declined", "generic_decline"),
    "pm_card_visa_chargeDeclined": ("card_declined", "generic_decline"),
    "pm_card_chargeDeclinedInsufficientFunds": ("card_declined", "insufficient_funds"),
}
_SEARCH = re.compile(r"metadata\['payment_id'\]:'([^']*)'")


# -- the server (child process) ----------------------------------------------------------


class Ledger:
    """Every PaymentIntent and idempotent answer; one lock, the server is threaded."""

    def __init__(
        self,
        *,
        latency_ms: tuple[float, float],
        lose_rate: float,
        seed: int,
        lookup_latency_ms: float = 0.0,
    ) -> None:
        self.lock = threading.Lock()
        self.lookup_latency_s = lookup_latency_ms / 1000.0
        # Brownouts (POST /_control): set while stalled; the rate limit's token bucket.
        self.stalled = threading.Event()
        self.rate_limit = 0.0
        self.retry_after_s = 1.0
        # New charges answered 500 (stored under their key and replayed, as Stripe does).
        self.fail_with_500 = False
        self.tokens = 0.0
        self.refilled_at = time.monotonic()
        # The connections of the API requests in flight (see Handler._enter).
        self.in_flight: set[socket.socket] = set()
        self.intents: dict[str, dict[str, Any]] = {}
        self.by_payment: dict[str, list[str]] = {}
        self.refunds: dict[str, dict[str, Any]] = {}
        # key -> (parameters, HTTP status, body)
        self.answers: dict[str, tuple[list[tuple[str, str]], int, bytes]] = {}
        self.executing: set[str] = set()
        self.stats: Counter[str] = Counter()
        self.latency_ms = latency_ms
        self.lose_rate = lose_rate
        self.random = random.Random(seed)


def _intent(params: dict[str, str], metadata: dict[str, str]) -> dict[str, Any]:
    method = params.get("payment_method", "")
    decline = DECLINING_METHODS.get(method)
    intent: dict[str, Any] = {
        "id": f"pi_{uuid.uuid4().hex[:24]}",
        "object": "payment_intent",
        "amount": int(params.get("amount", "0")),
        "currency": params.get("currency", ""),
        "payment_method": method,
        "metadata": metadata,
        "created": int(time.time()),
        "livemode": False,
        "latest_charge": f"ch_{uuid.uuid4().hex[:24]}",
        "status": "succeeded",
        "last_payment_error": None,
    }
    if decline is not None:
        code, decline_code = decline
        intent["status"] = "requires_payment_method"
        intent["last_payment_error"] = {
            "type": "card_error",
            "code": code,
            "decline_code": decline_code,
            "message": "Your card was declined.",
        }
    return intent


def _limited(ledger: Ledger) -> bool:
    """Whether this request is over the rate limit (call with the lock held)."""
    if ledger.rate_limit <= 0:
        return False
    now = time.monotonic()
    ledger.tokens = min(
        ledger.rate_limit, ledger.tokens + (now - ledger.refilled_at) * ledger.rate_limit
    )
    ledger.refilled_at = now
    if ledger.tokens >= 1.0:
        ledger.tokens -= 1.0
        return False
    ledger.stats["rate_limited"] += 1
    return True


def _hung_up(connection: socket.socket) -> bool:
    """True if the peer closed `connection` (nothing read from it)."""
    try:
        readable, _, _ = select.select([connection], [], [], 0)
        return bool(readable) and not connection.recv(1, socket.MSG_PEEK)
    except (OSError, ValueError):  # closed meanwhile by its own handler
        return True


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: GatewayServer

    def _enter(self) -> bool:
        """Count an API request in flight; False if it was answered already (429)."""
        ledger = self.server.ledger
        with ledger.lock:
            if _limited(ledger):
                self.send_response(429)
                body = json.dumps(
                    {
                        "error": {
                            "type": "invalid_request_error",
                            "code": "rate_limit",
                            "message": "Too many requests hit the API too quickly.",
                        }
                    }
                ).encode()
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Retry-After", f"{ledger.retry_after_s:g}")
                self.end_headers()
                self.wfile.write(body)
                return False
            # A request whose caller hung up no longer counts, from the moment it did: its
            # handler may not have noticed yet (a stalled one looks every 20 ms), but the
            # caller's next request can arrive before that.
            ledger.in_flight = {c for c in ledger.in_flight if not _hung_up(c)}
            ledger.in_flight.add(self.connection)
            ledger.stats["in_flight_max"] = max(
                ledger.stats["in_flight_max"], len(ledger.in_flight)
            )
        return True

    def _leave(self) -> None:
        ledger = self.server.ledger
        with ledger.lock:
            ledger.in_flight.discard(self.connection)

    def _hang(self) -> None:
        """A stalled gateway: hold the request unanswered until the stall ends or the
        caller hangs up, then drop the connection."""
        ledger = self.server.ledger
        with ledger.lock:
            ledger.stats["stalled"] += 1
        while ledger.stalled.is_set():
            readable, _, _ = select.select([self.connection], [], [], 0.02)
            if readable and not self.connection.recv(1, socket.MSG_PEEK):
                break  # the caller gave up
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)

    def do_control(self, body: str) -> None:
        ledger = self.server.ledger
        change = json.loads(body or "{}")
        with ledger.lock:
            if "stall" in change:
                (ledger.stalled.set if change["stall"] else ledger.stalled.clear)()
            if "rate_limit" in change:
                ledger.rate_limit = float(change["rate_limit"] or 0.0)
                ledger.tokens = ledger.rate_limit
                ledger.refilled_at = time.monotonic()
            if "retry_after_s" in change:
                ledger.retry_after_s = float(change["retry_after_s"])
            if "fail_with_500" in change:
                ledger.fail_with_500 = bool(change["fail_with_500"])
        self._json(200, {"stalled": ledger.stalled.is_set(), "rate_limit": ledger.rate_limit})

    def log_message(self, format: str, *args: Any) -> None:
        pass  # quiet: `note` logs the charges, the counters say the rest

    def note(self, key: str | None, pairs: list[tuple[str, str]], what: str) -> None:
        payment = dict(pairs).get("metadata[payment_id]", "?")
        sys.stderr.write(f"{time.time():.3f} POST key={key} payment={payment} {what}\n")
        sys.stderr.flush()

    def _send(self, status: int, body: bytes, *, replayed: bool = False) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Request-Id", f"req_{uuid.uuid4().hex[:14]}")
        if replayed:
            self.send_header("Idempotent-Replayed", "true")
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, payload: object) -> None:
        self._send(status, json.dumps(payload).encode())

    def _error(self, status: int, kind: str, message: str, **extra: Any) -> None:
        self._json(status, {"error": {"type": kind, "message": message, **extra}})

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        if url.path == "/_ledger":
            self._get(url)
            return
        if not self._enter():
            return
        try:
            if self.server.ledger.stalled.is_set():
                self._hang()
                return
            if self.server.ledger.lookup_latency_s > 0:
                time.sleep(self.server.ledger.lookup_latency_s)
            self._get(url)
        finally:
            self._leave()

    def _get(self, url: Any) -> None:
        ledger = self.server.ledger
        query = dict(parse_qsl(url.query))
        with ledger.lock:
            ledger.stats["get"] += 1
            if url.path == "/_ledger":
                self._json(
                    200,
                    {
                        "intents": list(ledger.intents.values()),
                        "refunds": list(ledger.refunds.values()),
                        "stats": ledger.stats,
                    },
                )
                return
            if url.path == "/v1/refunds":
                wanted = query.get("payment_intent")
                data = [r for r in ledger.refunds.values() if r["payment_intent"] == wanted]
                self._json(200, {"object": "list", "data": data, "has_more": False})
                return
            if url.path == "/v1/payment_intents/search":
                ledger.stats["search"] += 1
                found = _SEARCH.search(query.get("query", ""))
                ids = ledger.by_payment.get(found.group(1), []) if found else []
                data = [ledger.intents[i] for i in ids]
                self._json(
                    200,
                    {"object": "search_result", "data": data, "has_more": False, "url": url.path},
                )
                return
            if url.path == "/v1/payment_intents":
                intents = list(ledger.intents.values())
                start = 0
                if "starting_after" in query:
                    ids = [i["id"] for i in intents]
                    if query["starting_after"] in ids:
                        start = ids.index(query["starting_after"]) + 1
                limit = int(query.get("limit", "10"))
                page = intents[start : start + limit]
                self._json(
                    200,
                    {
                        "object": "list",
                        "data": page,
                        "has_more": start + limit < len(intents),
                        "url": url.path,
                    },
                )
                return
        self._error(404, "invalid_request_error", "Unrecognized request URL", code="not_found")

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", "0"))
        raw = self.rfile.read(length)
        if len(raw) < length:
            # The client died while sending (a SIGKILL mid-request): nothing to execute.
            self.close_connection = True
            return
        body = raw.decode()
        path = urlsplit(self.path).path
        if path == "/_control":
            self.do_control(body)
            return
        if path not in ("/v1/payment_intents", "/v1/refunds"):
            self._error(404, "invalid_request_error", "Unrecognized request URL")
            return
        if not self._enter():
            return
        try:
            self._create(body, path)
        finally:
            self._leave()

    def _create(self, body: str, path: str) -> None:
        ledger = self.server.ledger
        pairs = sorted(parse_qsl(body, keep_blank_values=True))
        key = self.headers.get("Idempotency-Key")
        with ledger.lock:
            ledger.stats["create_requests"] += 1
            stalled = ledger.stalled.is_set()
            # A stalled gateway executes one new charge in two before it falls silent.
            executes = not stalled or (
                key not in ledger.answers
                and key not in ledger.executing
                and ledger.random.random() < 0.5
            )
        if not executes:
            self._hang()
            return
        with ledger.lock:
            if key is not None and key in ledger.answers:
                seen, status, answer = ledger.answers[key]
                if seen != pairs:
                    ledger.stats["idempotency_mismatch"] += 1
                    self.note(key, pairs, f"400 idempotency mismatch (first: {seen})")
                    self._error(
                        400,
                        "idempotency_error",
                        "Keys for idempotent requests can only be used with the same "
                        "parameters they were first used with.",
                    )
                    return
                ledger.stats["replayed"] += 1
                self.note(key, pairs, f"{status} replayed")
                self._send(status, answer, replayed=True)
                return
            if key is not None and key in ledger.executing:
                ledger.stats["concurrent_key"] += 1
                self.note(key, pairs, "409 key in use")
                self._error(
                    409,
                    "invalid_request_error",
                    "There is currently another in-progress request using this Idempotent Key.",
                    code="idempotency_key_in_use",
                )
                return
            if ledger.fail_with_500:
                ledger.stats["errors_500"] += 1
                answer = json.dumps(
                    {"error": {"type": "api_error", "message": "Something went wrong."}}
                ).encode()
                if key is not None:
                    ledger.answers[key] = (pairs, 500, answer)
                self.note(key, pairs, "500 (stored under the key)")
                self._send(500, answer)
                return
            if key is not None:
                ledger.executing.add(key)
            low, high = ledger.latency_ms
            delay = ledger.random.uniform(low, high) / 1000.0
            lose = ledger.random.random() < ledger.lose_rate
        try:
            time.sleep(delay)
            params = dict(pairs)
            metadata = {k[len("metadata[") : -1]: v for k, v in pairs if k.startswith("metadata[")}
            if path == "/v1/refunds":
                status, answer = self._refund(ledger, key, pairs, params, metadata, lose)
                if lose:
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                self._send(status, answer)
                return
            intent = _intent(params, metadata)
            if intent["status"] == "succeeded":
                status, answer = 200, json.dumps(intent).encode()
            else:
                error = dict(intent["last_payment_error"])
                error["payment_intent"] = intent
                status, answer = 402, json.dumps({"error": error}).encode()
            with ledger.lock:
                ledger.intents[intent["id"]] = intent
                ledger.by_payment.setdefault(metadata.get("payment_id", ""), []).append(
                    intent["id"]
                )
                ledger.stats["created"] += 1
                ledger.stats[intent["status"]] += 1
                if key is not None:
                    ledger.answers[key] = (pairs, status, answer)
                if lose:
                    ledger.stats["lost_responses"] += 1
                self.note(
                    key, pairs, f"{status} {intent['id']}{' (response lost)' if lose else ''}"
                )
        finally:
            if key is not None:
                with ledger.lock:
                    ledger.executing.discard(key)
        if stalled:
            self._hang()  # charged, and the caller never hears of it
            return
        if lose:
            # Charged, and the caller never hears of it.
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        self._send(status, answer)

    def _refund(
        self,
        ledger: Ledger,
        key: str | None,
        pairs: list[tuple[str, str]],
        params: dict[str, str],
        metadata: dict[str, str],
        lose: bool,
    ) -> tuple[int, bytes]:
        """Execute one refund (the caller holds the key as executing; not the lock)."""
        with ledger.lock:
            intent = ledger.intents.get(params.get("payment_intent", ""))
            amount = int(params.get("amount", "0"))
            if intent is None or intent["status"] != "succeeded":
                status, answer = 400, json.dumps(
                    {"error": {"type": "invalid_request_error", "code": "charge_not_refundable",
                               "message": "no succeeded PaymentIntent to refund"}}
                ).encode()  # fmt: skip
            else:
                same = [r for r in ledger.refunds.values() if r["payment_intent"] == intent["id"]]
                refunded = sum(r["amount"] for r in same)
                if amount < 1 or refunded + amount > intent["amount"]:
                    ledger.stats["refunds_refused"] += 1
                    status, answer = 400, json.dumps(
                        {"error": {"type": "invalid_request_error", "code": "amount_too_large",
                                   "message": "Refund amount is greater than unrefunded amount"}}
                    ).encode()  # fmt: skip
                else:
                    refund = {
                        "id": f"re_{uuid.uuid4().hex[:24]}",
                        "object": "refund",
                        "amount": amount,
                        "currency": intent["currency"],
                        "payment_intent": intent["id"],
                        "metadata": metadata,
                        "status": "succeeded",
                        "created": int(time.time()),
                    }
                    ledger.refunds[refund["id"]] = refund
                    ledger.stats["refunds"] += 1
                    status, answer = 200, json.dumps(refund).encode()
            if key is not None:
                ledger.answers[key] = (pairs, status, answer)
            if lose:
                ledger.stats["lost_responses"] += 1
            self.note(key, pairs, f"refund {status}{' (response lost)' if lose else ''}")
        return status, answer


class GatewayServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    # A burst of new connections (a bulkhead's worth, or a bench's) must not be reset.
    request_queue_size = 256

    def __init__(self, port: int, ledger: Ledger) -> None:
        super().__init__(("127.0.0.1", port), Handler)
        self.ledger = ledger


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--latency-ms", default="0:0", help="MIN:MAX per charge")
    parser.add_argument("--lose-response-rate", type=float, default=0.0)
    parser.add_argument("--lookup-latency-ms", type=float, default=0.0)
    parser.add_argument("--rate-limit", type=float, default=0.0, help="requests/s; 0: none")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    low, _, high = args.latency_ms.partition(":")
    ledger = Ledger(
        latency_ms=(float(low), float(high or low)),
        lose_rate=args.lose_response_rate,
        seed=args.seed,
        lookup_latency_ms=args.lookup_latency_ms,
    )
    ledger.rate_limit = args.rate_limit
    ledger.tokens = args.rate_limit
    with GatewayServer(args.port, ledger) as server:
        server.serve_forever()


# -- the controller (test process) -------------------------------------------------------


class FakeStripe:
    """The gateway process on a free port; `ledger()` reads what it holds."""

    def __init__(
        self,
        *,
        latency_ms: tuple[float, float] = (0.0, 0.0),
        lose_response_rate: float = 0.0,
        seed: int = 0,
        lookup_latency_ms: float = 0.0,
        rate_limit: float = 0.0,
    ) -> None:
        # Imported here: this file also runs as the gateway's own script, outside the package.
        from .net import free_port
        from .server_process import ServerProcess

        self.port = free_port()
        self.latency_ms = latency_ms
        self.lose_response_rate = lose_response_rate
        self.seed = seed
        self.lookup_latency_ms = lookup_latency_ms
        self.rate_limit = rate_limit
        self._server = ServerProcess("fake gateway")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 20.0) -> FakeStripe:
        import httpx

        low, high = self.latency_ms
        self._server.start(
            [
                sys.executable,
                str(Path(__file__)),
                "--port",
                str(self.port),
                "--latency-ms",
                f"{low}:{high}",
                "--lose-response-rate",
                str(self.lose_response_rate),
                "--seed",
                str(self.seed),
                "--lookup-latency-ms",
                str(self.lookup_latency_ms),
                "--rate-limit",
                str(self.rate_limit),
            ],
            probe=lambda: httpx.get(f"{self.url}/_ledger", timeout=1.0),
            timeout_s=timeout_s,
        )
        return self

    def stop(self) -> None:
        self._server.stop()

    def __enter__(self) -> FakeStripe:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log_text(self) -> str:
        """One line per charge request: key, payment, what the gateway answered."""
        return self._server.log_text()

    def refunds(self) -> list[dict[str, Any]]:
        """Every Refund the gateway made (oldest first)."""
        import httpx

        answer = httpx.get(f"{self.url}/_ledger", timeout=10.0).raise_for_status().json()
        refunds: list[dict[str, Any]] = answer["refunds"]
        return refunds

    def control(self, **change: object) -> dict[str, Any]:
        """Switch brownouts: `stall=True|False`, `rate_limit=N` (per second, 0: none),
        `retry_after_s=S` (the 429s' Retry-After), `fail_with_500=True|False`."""
        import httpx

        answer = httpx.post(f"{self.url}/_control", json=change, timeout=10.0)
        result: dict[str, Any] = answer.raise_for_status().json()
        return result

    def ledger(self) -> tuple[list[dict[str, Any]], dict[str, int]]:
        """Every PaymentIntent (oldest first) and the counters."""
        import httpx

        answer = httpx.get(f"{self.url}/_ledger", timeout=10.0).raise_for_status().json()
        return answer["intents"], answer["stats"]

    def env(self) -> dict[str, str]:
        """The service's variables for charging here through the sandbox processor."""
        return {
            "PAYMENT_PROCESSOR": "sandbox",
            "PAYMENT_STRIPE_API_KEY": API_KEY,
            "PAYMENT_STRIPE_API_BASE": self.url,
        }


if __name__ == "__main__":
    main()
