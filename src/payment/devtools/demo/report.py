"""What a demo run saw, whether the service kept the contract, and its printed summary."""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Sequence
from typing import TextIO

import msgspec

from payment.devtools.demo.bookings import Run


class DemoReport(msgspec.Struct, frozen=True, kw_only=True):
    """What a demo run saw; `ok` says whether the service kept the contract (section 4).

    Counts are per booking after deduplication by (`ce_source`, `ce_id`). Latencies run
    from sending a request to receiving its first terminal event.
    """

    run_id: str
    requests_sent: int
    completed: int
    failed_by_reason: dict[str, int]
    no_outcome: int
    conflicting_outcomes: int
    missing_initiated: int
    duplicates_sent: int
    duplicates_ignored: int
    rerequest_sent: bool
    rerequest_replayed: bool
    invalid_rejected: bool | None
    poison_dead_lettered: bool | None
    dead_letters: int
    latency_p50_ms: float | None
    latency_p95_ms: float | None
    latency_p99_ms: float | None
    outcomes_s: float
    payments_per_s: float | None
    elapsed_s: float
    timed_out: bool
    problems: tuple[str, ...]
    ok: bool


def _percentile(ordered: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile of an ascending sequence."""
    if not ordered:
        return None
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def _expect(ok: bool, problem: str, problems: list[str]) -> bool:
    """`ok`, after noting `problem` when it is not."""
    if not ok:
        problems.append(problem)
    return ok


def build_report(run: Run, started: float, timed_out: bool) -> DemoReport:
    problems: list[str] = []
    requests = run.requests
    completed = sum(1 for b in requests if b.outcome == "completed")
    failed = Counter(b.outcome for b in requests if b.outcome not in (None, "completed"))
    no_outcome = sum(1 for b in requests if not b.terminal)
    conflicting = sum(1 for b in requests if len(b.terminal) > 1)
    missing_initiated = sum(1 for b in requests if b.terminal and not b.initiated)
    if no_outcome:
        problems.append(f"{no_outcome} request(s) got no terminal event")
    if conflicting:
        problems.append(f"{conflicting} booking(s) got more than one distinct terminal event")
    if missing_initiated:
        problems.append(f"{missing_initiated} payment(s) ended without payment.initiated")
    if n := sum(1 for b in requests if len(b.initiated) > 1):
        problems.append(f"{n} booking(s) got more than one distinct payment.initiated")
    if n := sum(1 for b in requests if b.dead_letters):
        problems.append(f"{n} valid request(s) went to the dead-letter topic")
    if run.malformed:
        problems.append(f"{run.malformed} outbound event(s) without readable data or ce_id")

    # Ignored = no extra delivery: a redelivered request publishes nothing (4.2).
    ignored = sum(
        1
        for b in run.duplicates_sent
        if b.terminal_deliveries <= b.expected_terminal_deliveries and b.initiated_deliveries <= 1
    )
    if ignored < len(run.duplicates_sent):
        problems.append(
            f"{len(run.duplicates_sent) - ignored} of {len(run.duplicates_sent)} duplicate(s) "
            "got an extra event"
        )
    replayed = False
    if run.extras:
        target = run.rerequest
        replayed = _expect(
            target is not None
            and len(target.terminal) == 1
            and target.terminal_deliveries >= target.expected_terminal_deliveries,
            "the re-request did not replay the outcome with its ce_id",
            problems,
        )
    invalid_rejected: bool | None = None
    if (invalid := run.invalid) is not None:
        invalid_rejected = _expect(
            list(invalid.terminal.values()) == ["invalid_request"]
            and not invalid.initiated
            and not invalid.dead_letters,
            "the invalid request was not answered by exactly one invalid_request",
            problems,
        )
    poison_dead_lettered: bool | None = None
    if (poison := run.poison) is not None:
        poison_dead_lettered = _expect(
            len(poison.dead_letters) == 1 and not poison.terminal and not poison.initiated,
            "the poison message did not reach the dead-letter topic (once)",
            problems,
        )
    dead_letters = sum(len(b.dead_letters) for b in run.by_id.values()) + run.foreign_dead_letters
    if run.foreign_dead_letters:
        problems.append(f"{run.foreign_dead_letters} unexpected dead letter(s) of this run")
    if timed_out:
        problems.append("timed out")

    latencies = sorted(
        (b.first_terminal_at - b.sent_at) * 1000
        for b in requests
        if b.first_terminal_at is not None and b.sent_at is not None
    )
    sent_times = [b.sent_at for b in requests if b.sent_at is not None]
    answer_times = [b.first_terminal_at for b in requests if b.first_terminal_at is not None]
    outcomes_s = max(answer_times) - min(sent_times) if answer_times and sent_times else 0.0
    return DemoReport(
        run_id=run.run_id,
        requests_sent=sum(1 for b in requests if b.sent_at is not None),
        completed=completed,
        failed_by_reason={str(k): v for k, v in sorted(failed.items(), key=lambda kv: str(kv[0]))},
        no_outcome=no_outcome,
        conflicting_outcomes=conflicting,
        missing_initiated=missing_initiated,
        duplicates_sent=len(run.duplicates_sent),
        duplicates_ignored=ignored,
        rerequest_sent=run.rerequest is not None,
        rerequest_replayed=replayed,
        invalid_rejected=invalid_rejected,
        poison_dead_lettered=poison_dead_lettered,
        dead_letters=dead_letters,
        latency_p50_ms=_percentile(latencies, 50),
        latency_p95_ms=_percentile(latencies, 95),
        latency_p99_ms=_percentile(latencies, 99),
        outcomes_s=outcomes_s,
        payments_per_s=len(answer_times) / outcomes_s if outcomes_s > 0 else None,
        elapsed_s=time.monotonic() - started,
        timed_out=timed_out,
        problems=tuple(problems),
        ok=not problems,
    )


def _yes_no(value: bool | None) -> str:
    return "n/a" if value is None else ("yes" if value else "NO")


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def print_summary(report: DemoReport, out: TextIO) -> None:
    rows: list[tuple[str, str]] = [
        ("requests sent", str(report.requests_sent)),
        ("completed", str(report.completed)),
    ]
    rows += [(f"failed: {reason}", str(n)) for reason, n in report.failed_by_reason.items()]
    if not report.failed_by_reason:
        rows.append(("failed", "0"))
    rows.append(("no outcome", str(report.no_outcome)))
    rows.append(("more than one outcome", str(report.conflicting_outcomes)))
    if report.rerequest_sent or report.invalid_rejected is not None:
        rows += [
            (
                "duplicates sent / ignored",
                f"{report.duplicates_sent} / {report.duplicates_ignored}",
            ),
            ("re-request replayed, same ce_id", _yes_no(report.rerequest_replayed)),
            ("invalid request rejected", _yes_no(report.invalid_rejected)),
            (
                "dead letters (poison seen)",
                f"{report.dead_letters} ({_yes_no(report.poison_dead_lettered)})",
            ),
        ]
    rows += [
        (
            "latency p50 / p95 / p99 (ms)",
            f"{_ms(report.latency_p50_ms)} / {_ms(report.latency_p95_ms)} / "
            f"{_ms(report.latency_p99_ms)}",
        ),
        (
            "throughput (payments/s)",
            "-" if report.payments_per_s is None else f"{report.payments_per_s:.0f}",
        ),
        ("result", "OK" if report.ok else "FAILED"),
    ]
    label_width = max(len(label) for label, _ in rows)
    value_width = max(len(value) for _, value in rows)
    out.write(f"\ndemo run {report.run_id}: {report.elapsed_s:.2f} s\n")
    for label, value in rows:
        out.write(f"  {label:<{label_width}}  {value:>{value_width}}\n")
    for problem in report.problems:
        out.write(f"  ! {problem}\n")
    out.flush()
