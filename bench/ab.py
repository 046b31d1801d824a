"""A/B of two revisions by bench/e2e.py: runs one after the other, alternating, then medians.

    .venv/bin/python bench/ab.py --old HEAD~1 --rate 1000 --duration 20 --pairs 3

The old side runs from a detached git worktree of `--old` (removed afterwards), the new
side from this checkout, or from a worktree of `--new` if given. Each run is this
checkout's bench/e2e.py with PYTHONPATH on that side's `src`, so the service and the
code it runs are that side's; the virtualenv, PostgreSQL and a fresh broker per run are
shared. The order goes A B B A A B …: a machine that drifts over the series weighs on
both sides alike. Single runs on the 2-core machine spread wider than most changes
(docs/performance.md), so what to read is the medians and how many pairs agree.
Extra arguments after `--` go to every e2e.py run (say `-- --latency-ms 300`).
`--outputs DIR` keeps each run's whole e2e.py output (`DIR/01-A.txt`, …): the tables of
`--timeline` and `--task-cpu`, which the summary does not compare.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from benchlib import table

HERE = Path(__file__).resolve().parent
CHECKOUT = HERE.parent

# The e2e.py columns compared (lower is better but for payments/s).
MEASURES = ("p50", "p95", "p99", "payments/s", "svc CPU ms/pay", "PG ms/pay", "broker ms/pay")


def order(pairs: int) -> str:
    """The sides' turns: A B, then B A, then A B, … (`pairs` of each)."""
    return "".join("AB" if n % 2 == 0 else "BA" for n in range(pairs))


def parse_row(output: str) -> dict[str, float]:
    """The measures of the first row of e2e.py's results table (its HEADER, `| run | …`;
    `--timeline` and `--task-cpu` print tables of their own before it)."""
    lines = [line for line in output.splitlines() if line.startswith("|")]
    at = next((n for n, line in enumerate(lines) if line.startswith("| run ")), None)
    if at is None:
        raise ValueError("no e2e table in the output")
    names = [cell.strip() for cell in lines[at].strip("|").split("|")]
    rows = [line for line in lines[at + 1 :] if not line.startswith("|-")]
    if not rows:
        raise ValueError("no e2e row in the output")
    cells = dict(zip(names, (c.strip() for c in rows[0].strip("|").split("|")), strict=True))
    p50, p95, p99 = (float(v.replace(",", "")) for v in cells["p50/p95/p99 ms"].split("/"))
    found = {"p50": p50, "p95": p95, "p99": p99}
    for name in MEASURES[3:]:
        found[name] = float(cells[name].replace(",", ""))
    return found


def medians(runs: Sequence[Mapping[str, float]]) -> dict[str, float]:
    return {name: statistics.median(run[name] for run in runs) for name in MEASURES}


def summary(a: Sequence[Mapping[str, float]], b: Sequence[Mapping[str, float]]) -> str:
    """Per measure: each side's median, B / A, and in how many pairs B did better."""
    ma, mb = medians(a), medians(b)
    rows = []
    for name in MEASURES:
        higher_is_better = name == "payments/s"
        better = sum(
            (y[name] > x[name]) if higher_is_better else (y[name] < x[name])
            for x, y in zip(a, b, strict=False)
        )
        ratio = mb[name] / ma[name] if ma[name] else float("nan")
        rows.append(
            [name, f"{ma[name]:,.2f}", f"{mb[name]:,.2f}", f"{ratio:.2f}", f"{better}/{len(b)}"]
        )
    return table(rows, ["measure", "A median", "B median", "B / A", "pairs B better"])


@contextmanager
def tree(revision: str | None) -> Iterator[Path]:
    """This checkout (None), or a detached worktree of `revision`, removed afterwards."""
    if revision is None:
        yield CHECKOUT
        return
    with tempfile.TemporaryDirectory(prefix="bench-ab-") as parent:
        path = Path(parent) / "tree"
        git = ["git", "-C", str(CHECKOUT), "worktree"]
        subprocess.run([*git, "add", "--detach", str(path), revision], check=True)
        try:
            yield path
        finally:
            subprocess.run([*git, "remove", "--force", str(path)], check=False)


def keep_output(directory: Path, turn: int, side: str, output: str) -> Path:
    """Write one run's whole e2e.py output into `directory`, named by its turn and side."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{turn:02d}-{side}.txt"
    path.write_text(output)
    return path


def run_once(side: Path, e2e_args: Sequence[str]) -> tuple[str, dict[str, float], str]:
    """One e2e.py run with `side`'s code: its table row, the measures in it, and its
    whole output."""
    env = {**os.environ, "PYTHONPATH": str(side / "src")}
    command = [sys.executable, str(HERE / "e2e.py"), *e2e_args]
    with subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as child:
        try:
            stdout, stderr = child.communicate()
        except BaseException:
            # Interrupted: e2e.py stops its broker, service and database on SIGINT.
            child.send_signal(signal.SIGINT)
            try:
                child.wait(timeout=60)
            except subprocess.TimeoutExpired:
                child.kill()
            raise
    if child.returncode != 0:
        raise SystemExit(f"ab: e2e.py failed ({child.returncode}):\n{stderr[-2000:]}")
    row = next(line for line in stdout.splitlines() if line.startswith("| rate-"))
    return row, parse_row(stdout), stdout


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # so that the run in progress and the worktrees are cleaned up


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", required=True, help="revision of side A")
    parser.add_argument("--new", default=None, help="revision of side B (default: this checkout)")
    parser.add_argument("--pairs", type=int, default=3, help="runs of each side")
    parser.add_argument("--rate", type=float, default=1000)
    parser.add_argument("--duration", type=float, default=20)
    parser.add_argument("--outputs", type=Path, help="keep each run's whole output in DIR")
    parser.add_argument("e2e_args", nargs="*", help="after --: more e2e.py arguments")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)
    e2e_args = ["--rate", str(args.rate), "--duration", str(args.duration), *args.e2e_args]
    runs: dict[str, list[dict[str, float]]] = {"A": [], "B": []}
    with tree(args.old) as a, tree(args.new) as b:
        print(f"ab: A = {args.old} ({a}), B = {args.new or 'this checkout'} ({b})", flush=True)
        for turn, side in enumerate(order(args.pairs), start=1):
            row, measures, output = run_once(a if side == "A" else b, e2e_args)
            runs[side].append(measures)
            print(f"{side} {row}", flush=True)
            if args.outputs is not None:
                print(f"  (kept in {keep_output(args.outputs, turn, side, output)})", flush=True)
    print()
    print(summary(runs["A"], runs["B"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
