"""`payment-service show` and `review`: a payment's stream, the payments flagged for
review, and resolving one after asking the gateway."""

from __future__ import annotations

import argparse
import json
import sys
import uuid
from typing import TYPE_CHECKING

from payment.cli.common import require_database
from payment.settings import EXIT_CONFIGURATION, DependencyUnavailable, Settings, run_defaults

if TYPE_CHECKING:
    from payment.application.commands import ResolveReview
    from payment.application.review import ReviewLookup
    from payment.domain.events import PaymentReviewResolved


async def command(settings: Settings, args: argparse.Namespace) -> int:
    if args.command == "show":
        return await show(settings, args.payment_id, args.booking)
    if args.action == "list":
        return await list_reviews(settings, args.json)
    return await resolve(settings, args)


def _payment_id(text: str, command: str) -> uuid.UUID | None:
    """`text` as a payment id, or None after saying it is not one."""
    try:
        return uuid.UUID(text)
    except ValueError:
        print(f"{command}: not a payment id (UUID): {text[:64]!r}", file=sys.stderr)
        return None


async def show(settings: Settings, payment_id: str | None, booking: str | None) -> int:
    from payment.adapters.postgres.queries import render_payment
    from payment.runtime.preflight import check_postgres

    url = require_database(settings)
    await check_postgres(url)
    pid: uuid.UUID | None = None
    if payment_id is not None:
        pid = _payment_id(payment_id, "show")
        if pid is None:
            return 2
    lines = await render_payment(url, payment_id=pid, booking_id=booking)
    if lines is None:
        print("show: no such payment", file=sys.stderr)
        return 1
    print("\n".join(lines))
    return 0


async def list_reviews(settings: Settings, as_json: bool) -> int:
    from payment.adapters.postgres.review_queries import open_reviews

    reviews = await open_reviews(require_database(settings))
    if not as_json:
        print(f"{len(reviews)} payments flagged for review")
    for r in reviews:
        flagged = r.flagged_at.isoformat(timespec="seconds")
        if as_json:
            facts = {
                "payment_id": str(r.payment_id),
                "booking_id": r.booking_id,
                "amount": r.amount,
                "currency": r.currency,
                "flagged_at": flagged,
                "detail": r.detail,
            }
            print(json.dumps(facts, ensure_ascii=False))
        else:
            print(
                f"{r.payment_id}  booking={r.booking_id}  {r.amount} {r.currency}"
                f"  flagged {flagged}: {r.detail}"
            )
    return 0


async def resolve(settings: Settings, args: argparse.Namespace) -> int:
    from payment.application.commands import ResolveReview
    from payment.application.review import NoSuchPayment
    from payment.domain.errors import IllegalTransition, ReviewDisagreesWithGateway

    require_database(settings)
    payment_id = _payment_id(args.payment_id, "review resolve")
    if payment_id is None:
        return EXIT_CONFIGURATION
    cmd = ResolveReview(
        payment_id=payment_id,
        outcome=args.outcome,
        reason=args.reason,
        resolved_by=args.by,
        force=args.force,
    )
    try:
        resolution, found = await resolve_with_gateway(settings, cmd)
    except NoSuchPayment:
        print("review resolve: no such payment", file=sys.stderr)
        return 1
    except ReviewDisagreesWithGateway as exc:
        print(
            f"review resolve: refused: {exc}; nothing recorded (check the gateway, or"
            " --force to record it anyway)",
            file=sys.stderr,
        )
        return 1
    except IllegalTransition as exc:
        print(f"review resolve: refused: {exc}", file=sys.stderr)
        return 1
    forced = " (forced against the gateway)" if resolution.forced else ""
    print(
        f"review resolve: {payment_id} {resolution.outcome}{forced}; the gateway answered"
        f" {found.answer}{f' ({found.reference})' if found.reference else ''};"
        f" recorded by {resolution.resolved_by}; payment.{resolution.outcome} queued for"
        " publication"
    )
    return 0


async def resolve_with_gateway(
    settings: Settings, cmd: ResolveReview
) -> tuple[PaymentReviewResolved, ReviewLookup]:
    """The handler on the configured database and gateway (which must be chosen, as for
    `run`: the gateway is asked before anything is recorded)."""
    import psycopg
    import psycopg_pool

    from payment.adapters.startup import database_failure
    from payment.application.review import resolve_review
    from payment.bootstrap import make_container, resolved, shutdown_resources

    container = make_container(run_defaults(settings))
    try:
        try:
            await container.pool()
            uow_factory = await resolved(container.uow_factory())
        except (OSError, psycopg.Error, psycopg_pool.PoolTimeout) as exc:
            raise DependencyUnavailable(database_failure(exc, str(settings.database_url))) from exc
        gateway = await resolved(container.gateway())
        return await resolve_review(cmd, uow_factory, gateway, container.clock())
    finally:
        await shutdown_resources(container)
