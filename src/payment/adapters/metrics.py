"""In-process metrics (counters, gauges, histograms) rendered in Prometheus text format."""

from __future__ import annotations

import bisect
import threading
from collections.abc import Awaitable, Callable, Iterable

Labels = tuple[tuple[str, str], ...]

DEFAULT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


def _labels(labels: dict[str, str]) -> Labels:
    return tuple(sorted(labels.items()))


def _fmt(labels: Labels, extra: Iterable[tuple[str, str]] = ()) -> str:
    pairs = [*labels, *extra]
    if not pairs:
        return ""
    escaped = (
        f'{k}="{v.replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"'
        for k, v in pairs
    )
    return "{" + ",".join(escaped) + "}"


class Metrics:
    """A small registry: label values are bounded sets chosen by the code, never user input."""

    def __init__(self, namespace: str = "payment") -> None:
        self._ns = namespace
        self._lock = threading.Lock()
        self._help: dict[str, tuple[str, str]] = {}
        self._counters: dict[str, dict[Labels, float]] = {}
        self._gauges: dict[str, dict[Labels, float]] = {}
        self._hist: dict[str, dict[Labels, list[float]]] = {}
        self._buckets: dict[str, tuple[float, ...]] = {}
        self._collectors: list[Callable[[], Awaitable[None]]] = []

    def describe(self, name: str, kind: str, text: str) -> None:
        self._help[name] = (kind, text)

    def inc(self, name: str, amount: float = 1.0, **labels: str) -> None:
        with self._lock:
            series = self._counters.setdefault(name, {})
            key = _labels(labels)
            series[key] = series.get(key, 0.0) + amount

    def set(self, name: str, value: float, **labels: str) -> None:
        with self._lock:
            self._gauges.setdefault(name, {})[_labels(labels)] = value

    def observe(self, name: str, value: float, **labels: str) -> None:
        with self._lock:
            buckets = self._buckets.setdefault(name, DEFAULT_BUCKETS)
            series = self._hist.setdefault(name, {})
            # Per-bucket counts (non-cumulative), then sum and count at the end.
            row = series.setdefault(_labels(labels), [0.0] * (len(buckets) + 3))
            row[bisect.bisect_left(buckets, value)] += 1
            row[-2] += value
            row[-1] += 1

    def counter_value(self, name: str, **labels: str) -> float:
        return self._counters.get(name, {}).get(_labels(labels), 0.0)

    def add_collector(self, collect: Callable[[], Awaitable[None]]) -> None:
        """An async callback run before each scrape (for gauges read from the database)."""
        self._collectors.append(collect)

    async def render(self) -> str:
        for collect in self._collectors:
            try:
                await collect()
            except Exception:  # a failed collector must not break the scrape
                continue
        out: list[str] = []
        with self._lock:
            for name, series in sorted(self._counters.items()):
                self._head(out, name, "counter")
                for labels, value in sorted(series.items()):
                    out.append(f"{self._ns}_{name}_total{_fmt(labels)} {value:g}")
            for name, series in sorted(self._gauges.items()):
                self._head(out, name, "gauge")
                for labels, value in sorted(series.items()):
                    out.append(f"{self._ns}_{name}{_fmt(labels)} {value:g}")
            for name, hseries in sorted(self._hist.items()):
                self._head(out, name, "histogram")
                buckets = self._buckets[name]
                for labels, row in sorted(hseries.items()):
                    cumulative = 0.0
                    for bound, count in zip([*buckets, float("inf")], row, strict=False):
                        cumulative += count
                        le = "+Inf" if bound == float("inf") else f"{bound:g}"
                        out.append(
                            f"{self._ns}_{name}_bucket{_fmt(labels, [('le', le)])} {cumulative:g}"
                        )
                    out.append(f"{self._ns}_{name}_sum{_fmt(labels)} {row[-2]:g}")
                    out.append(f"{self._ns}_{name}_count{_fmt(labels)} {row[-1]:g}")
        return "\n".join(out) + "\n"

    def _head(self, out: list[str], name: str, kind: str) -> None:
        _, text = self._help.get(name, (kind, name.replace("_", " ")))
        full = f"{self._ns}_{name}" + ("_total" if kind == "counter" else "")
        out.append(f"# HELP {full} {text}")
        out.append(f"# TYPE {full} {kind}")
