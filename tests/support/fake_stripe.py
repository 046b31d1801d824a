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
`--latency-ms MIN:MAX` holds each charge that long.

Run as a script (stdlib only); `FakeStripe` starts and stops it on a free port.
"""

from __future__ import annotations

import argparse
import json
import random
import re
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

    def __init__(self, *, latency_ms: tuple[float, float], lose_rate: float, seed: int) -> None:
        self.lock = threading.Lock()
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


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: GatewayServer

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
        ledger = self.server.ledger
        url = urlsplit(self.path)
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
        ledger = self.server.ledger
        length = int(self.headers.get("Content-Length", "0"))
        raw = self.rfile.read(length)
        if len(raw) < length:
            # The client died while sending (a SIGKILL mid-request): nothing to execute.
            self.close_connection = True
            return
        body = raw.decode()
        path = urlsplit(self.path).path
        if path not in ("/v1/payment_intents", "/v1/refunds"):
            self._error(404, "invalid_request_error", "Unrecognized request URL")
            return
        pairs = sorted(parse_qsl(body, keep_blank_values=True))
        key = self.headers.get("Idempotency-Key")
        with ledger.lock:
            ledger.stats["create_requests"] += 1
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

    def __init__(self, port: int, ledger: Ledger) -> None:
        super().__init__(("127.0.0.1", port), Handler)
        self.ledger = ledger


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--latency-ms", default="0:0", help="MIN:MAX per charge")
    parser.add_argument("--lose-response-rate", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    low, _, high = args.latency_ms.partition(":")
    ledger = Ledger(
        latency_ms=(float(low), float(high or low)),
        lose_rate=args.lose_response_rate,
        seed=args.seed,
    )
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
    ) -> None:
        # Imported here: this file also runs as the gateway's own script, outside the package.
        from .net import free_port
        from .server_process import ServerProcess

        self.port = free_port()
        self.latency_ms = latency_ms
        self.lose_response_rate = lose_response_rate
        self.seed = seed
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
