"""OpenTelemetry metric data in the Prometheus text format, written by `prometheus_client`.

The instruments stay OpenTelemetry's (metrics.py); this module only names their series the
way the OpenTelemetry "Prometheus and OpenMetrics compatibility" spec does (dots become
underscores, the unit becomes a suffix: `s` -> `_seconds`, a `{annotation}` unit adds
nothing, and a monotonic sum gets `_total`) and hands the families to
`prometheus_client`'s exposition (format 0.0.4), which escapes and formats the values.

A family renamed in this release is written under its old name too (`Declared.alias`),
marked deprecated in its HELP, for one release (CHANGELOG.md, docs/operations.md).
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Final, Literal, NamedTuple

from opentelemetry.sdk.metrics.export import (
    Gauge,
    HistogramDataPoint,
    Metric,
    NumberDataPoint,
    Sum,
)
from opentelemetry.sdk.metrics.export import Histogram as HistogramData
from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.metrics_core import Metric as Family
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

Kind = Literal["counter", "gauge", "histogram"]


class Declared(NamedTuple):
    """An instrument the service declares: listed on every scrape, with or without samples.

    `alias` is the OpenTelemetry name it had before a rename, still exposed for a release.
    """

    name: str
    unit: str
    kind: Kind
    help: str
    alias: str | None = None


_INVALID_NAME_CHARS = re.compile(r"[^a-zA-Z0-9_:]")
_INVALID_LABEL_CHARS = re.compile(r"[^a-zA-Z0-9_]")
_UNIT_SUFFIXES: Final = {"s": "seconds", "ms": "milliseconds", "By": "bytes", "1": "ratio"}


@functools.lru_cache(maxsize=1024)  # a few dozen instruments, named on every scrape
def prometheus_name(name: str, unit: str, kind: Kind) -> str:
    """The Prometheus name of an OpenTelemetry instrument (the compatibility spec's rules)."""
    base = _INVALID_NAME_CHARS.sub("_", name).strip("_")
    base = re.sub(r"__+", "_", base)
    if unit and not unit.startswith("{"):
        suffix = _UNIT_SUFFIXES.get(unit, _INVALID_LABEL_CHARS.sub("", unit))
        if suffix == "ratio" and kind != "gauge":
            suffix = ""
        if suffix and not base.endswith("_" + suffix):
            base = f"{base}_{suffix}"
    if kind == "counter" and not base.endswith("_total"):
        base += "_total"
    return base


def render_prometheus(metrics: Iterable[Metric], declared: Iterable[Declared] = ()) -> str:
    """Prometheus text of OpenTelemetry metric data.

    Every `declared` instrument gets its HELP and TYPE lines even before it has a sample,
    so a scrape lists every series the service can produce.
    """
    by_name: dict[str, Metric] = {m.name: m for m in metrics}
    families: dict[str, Family] = {}
    for item in declared:
        metric = by_name.pop(item.name, None)
        name = prometheus_name(item.name, item.unit, item.kind)
        families[name] = _family(name, item.kind, item.help, metric)
        if item.alias is not None:
            old = prometheus_name(item.alias, item.unit, item.kind)
            help_text = f"deprecated alias of {name}, removed in the next release: {item.help}"
            families[old] = _family(old, item.kind, help_text, metric)
    for other in by_name.values():  # instruments not declared here (another library's)
        kind = _kind_of(other)
        if kind is not None:
            name = prometheus_name(other.name, other.unit or "", kind)
            families[name] = _family(name, kind, other.description or other.name, other)
    ordered = [families[name] for name in sorted(families)]
    return generate_latest(_Families(ordered)).decode()


class _Families(Collector):
    """The collector `generate_latest` reads: the families of one scrape, in order."""

    def __init__(self, families: Sequence[Family]) -> None:
        self._families = families

    def collect(self) -> Iterator[Family]:
        return iter(self._families)


def _family(name: str, kind: Kind, help_text: str, metric: Metric | None) -> Family:
    family: Family
    if kind == "counter":
        family = CounterMetricFamily(name, help_text)
    elif kind == "gauge":
        family = GaugeMetricFamily(name, help_text)
    else:
        family = HistogramMetricFamily(name, help_text)
    if metric is not None:
        _add_samples(family, name, metric)
    return family


def _add_samples(family: Family, name: str, metric: Metric) -> None:
    data = metric.data
    if isinstance(data, Sum | Gauge):
        for point in sorted(data.data_points, key=_point_key):
            assert isinstance(point, NumberDataPoint)
            family.add_sample(name, _labels(point.attributes), point.value)
    elif isinstance(data, HistogramData):
        for hpoint in sorted(data.data_points, key=_point_key):
            assert isinstance(hpoint, HistogramDataPoint)
            labels = _labels(hpoint.attributes)
            cumulative = 0
            bounds = [*hpoint.explicit_bounds, math.inf]
            for bound, count in zip(bounds, hpoint.bucket_counts, strict=False):
                cumulative += count
                le = {**labels, "le": floatToGoString(bound)}  # type: ignore[no-untyped-call]
                family.add_sample(f"{name}_bucket", le, cumulative)
            family.add_sample(f"{name}_sum", labels, hpoint.sum)
            family.add_sample(f"{name}_count", labels, hpoint.count)


def _labels(attributes: Mapping[str, object] | None) -> dict[str, str]:
    return {
        _INVALID_LABEL_CHARS.sub("_", str(key)): str(value)
        for key, value in (attributes or {}).items()
    }


def _kind_of(metric: Metric) -> Kind | None:
    data = metric.data
    if isinstance(data, Sum):
        return "counter" if data.is_monotonic else "gauge"
    if isinstance(data, Gauge):
        return "gauge"
    if isinstance(data, HistogramData):
        return "histogram"
    return None  # exponential histograms are not used here


def _point_key(point: NumberDataPoint | HistogramDataPoint) -> str:
    return repr(sorted((point.attributes or {}).items()))
