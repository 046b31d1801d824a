"""Branch coverage per layer from coverage.py's JSON report, and the floors CI holds.

    python tools/ci/coverage_layers.py [coverage.json] [--no-floors]

Prints statements and branches covered per layer (domain, application, adapters,
bootstrap/cli, devtools) and the least covered files; exits 1 when a layer is under its
floor. Coverage here counts statements and branches together, as coverage.py's own
percentage does. The floors are what the whole suite measured when they were set, a
little under: raise them as tests are added, never lower them to let a change through.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

# (layer, path prefixes under src/payment/, floor in percent). Set from CI's whole run at
# the end of session 5 (e46ea9a: domain 98.9, application 95.8, adapters 94.5,
# bootstrap/cli 92.7, devtools 88.7 %), about a point under for run-to-run variation.
# A module under no prefix fails the check: a new package must name its layer.
LAYERS: tuple[tuple[str, tuple[str, ...], float], ...] = (
    ("domain", ("domain/",), 98.0),
    ("application", ("application/",), 95.0),
    ("adapters", ("adapters/",), 93.5),
    (
        "bootstrap/cli",
        (
            "bootstrap",
            "service.py",
            "runtime/",
            "cli/",
            "settings/",
            "__init__.py",
            "__main__.py",
        ),
        91.5,
    ),
    ("devtools", ("devtools/",), 87.5),
)
WORST_SHOWN = 12


def _layer_of(path: str) -> str | None:
    marker = "payment/"
    if marker not in path:
        return None
    inside = path.replace("\\", "/").split(marker, 1)[1]
    for name, prefixes, _ in LAYERS:
        if inside.startswith(prefixes):
            return name
    return None


def _percent(covered: int, total: int) -> float:
    return 100.0 if total == 0 else 100.0 * covered / total


def main(argv: list[str]) -> int:
    enforce = "--no-floors" not in argv
    args = [a for a in argv if not a.startswith("--")]
    report = json.loads(Path(args[0] if args else "coverage.json").read_text())
    totals: dict[str, list[int]] = {name: [0, 0, 0, 0] for name, _, _ in LAYERS}
    files: list[tuple[float, str]] = []
    unassigned = []
    for path, data in report["files"].items():
        layer = _layer_of(path)
        if layer is None:
            if "payment/" in path:
                unassigned.append(path)  # a new module outside every layer's prefixes
            continue
        summary = data["summary"]
        counts = (
            summary["covered_lines"],
            summary["num_statements"],
            summary.get("covered_branches", 0),
            summary.get("num_branches", 0),
        )
        for i, value in enumerate(counts):
            totals[layer][i] += value
        files.append((_percent(counts[0] + counts[2], counts[1] + counts[3]), path))

    failed = []
    print(f"{'layer':<14} {'statements':>16} {'branches':>16} {'total':>8} {'floor':>7}")
    for name, _, floor in LAYERS:
        lines, statements, branches, all_branches = totals[name]
        total = _percent(lines + branches, statements + all_branches)
        verdict = "" if total >= floor else "  UNDER THE FLOOR"
        print(
            f"{name:<14} {lines:>7}/{statements:<8} {branches:>7}/{all_branches:<8}"
            f" {total:>7.1f}% {floor:>6.1f}%{verdict}"
        )
        if total < floor:
            failed.append(name)
    print("\nleast covered files (statements and branches):")
    for percent, path in sorted(files)[:WORST_SHOWN]:
        print(f"  {percent:5.1f}%  {path}")
    if unassigned:
        print("\nin no layer (add their prefix to LAYERS): " + ", ".join(sorted(unassigned)))
        failed.append("unassigned modules")
    if failed and enforce:
        print(f"\ncoverage: under the floor: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
