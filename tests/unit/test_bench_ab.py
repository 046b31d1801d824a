"""bench/ab.py's bookkeeping: the order of the runs, reading e2e.py's row, the medians."""

from __future__ import annotations

from pathlib import Path

from support.bench_scripts import load_bench_script

ab = load_bench_script("ab")
e2e = load_bench_script("e2e")


def e2e_output(p50: float, p99: float, cpu: float, rate: float = 998) -> str:
    """What e2e.py prints: its own table, made by its own HEADER."""
    row = ["rate-zero-1000", "1000", "20", "20000/20000", f"{rate:.0f}"]
    row += [f"{p50:.0f} / {p50 * 1.5:.0f} / {p99:.0f}", f"{cpu:.2f}", "65%", "33%", "0.48"]
    row += ["0.34", "0.7", "7,411", "93", "0.0", "2.41 1.14 0.86"]
    return "e2e: broker Apache Kafka 4.1.1\n\n" + ab.table([row], e2e.HEADER) + "\n"


def test_the_sides_take_turns_so_that_a_drift_weighs_on_both() -> None:
    assert ab.order(1) == "AB"
    assert ab.order(3) == "ABBAAB"
    assert ab.order(4).count("A") == ab.order(4).count("B") == 4


def test_a_row_of_e2e_is_read_by_its_header() -> None:
    measures = ab.parse_row(e2e_output(p50=42, p99=96, cpu=0.66))
    assert measures["p50"] == 42 and measures["p95"] == 63 and measures["p99"] == 96
    assert measures["svc CPU ms/pay"] == 0.66
    assert measures["payments/s"] == 998
    assert measures["PG ms/pay"] == 0.48 and measures["broker ms/pay"] == 0.34


def test_the_tables_printed_before_the_results_are_passed_over() -> None:
    timeline = ab.table([["total: scheduled -> received", "20000", "64.6"]], ["stage", "n", "p50"])
    measures = ab.parse_row(timeline + "\n" + e2e_output(p50=42, p99=96, cpu=0.66))
    assert (measures["p50"], measures["p99"]) == (42, 96)


def test_an_output_without_a_row_is_refused() -> None:
    for output in ("e2e: the broker did not start\n", ab.table([], e2e.HEADER)):
        try:
            ab.parse_row(output)
        except ValueError:
            continue
        raise AssertionError(f"read a row from {output!r}")


def test_the_summary_gives_medians_their_ratio_and_the_pairs_that_agree() -> None:
    a = [ab.parse_row(e2e_output(p50, 100, 0.70)) for p50 in (50, 60, 70)]
    b = [ab.parse_row(e2e_output(p50, 100, 0.70, rate=999)) for p50 in (40, 65, 45)]
    lines = {line.split("|")[1].strip(): line for line in ab.summary(a, b).splitlines()[2:]}
    p50 = [cell.strip() for cell in lines["p50"].strip("|").split("|")]
    assert p50 == ["p50", "60.00", "45.00", "0.75", "2/3"]
    rate = [cell.strip() for cell in lines["payments/s"].strip("|").split("|")]
    assert rate[-1] == "3/3"  # more payments/s is better


def test_a_kept_output_holds_the_tables_the_summary_passes_over(tmp_path: Path) -> None:
    tasks = ab.table([["relay passes", "0.072"]], ["task", "ms/payment"])
    output = tasks + "\n" + e2e_output(p50=42, p99=96, cpu=0.66)
    first = ab.keep_output(tmp_path / "runs", 1, "A", output)
    second = ab.keep_output(tmp_path / "runs", 2, "B", output)
    assert (first.name, second.name) == ("01-A.txt", "02-B.txt")
    assert "| relay passes | 0.072" in first.read_text()
    assert first.read_text() == output
