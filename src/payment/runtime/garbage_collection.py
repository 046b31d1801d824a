"""The cyclic garbage collector set for a long-running service, before it starts.

With CPython's defaults (a young collection every 700 net allocations of container
objects, older generations every 10 of the younger) the collector took 11-12 % of the
service's CPU at 1,000 payments/s (`perf record` of the process, GC functions' self
time): every full collection walks every object start-up made (modules, classes, the
container), and the handlers allocate thousands of short-lived containers per batch.

So `run` freezes what start-up allocated (`gc.freeze`: never traversed again) and
collects the young generation less often. Reference counting frees almost everything the
handlers make; only reference cycles wait for a collection, a little longer. Measured in
docs/performance.md (session 9): the collector's share fell to 0.2 %, service CPU per
payment by about 6 %, peak RSS unchanged.
"""

from __future__ import annotations

import gc
from typing import Final

# Net allocations of container objects between young collections (CPython: 700), and how
# many collections of a generation trigger one of the next (CPython: 10 and 10).
YOUNG_THRESHOLD: Final = 20_000
OLDER_THRESHOLDS: Final = (20, 20)


def settle_start_up_objects() -> None:
    """Collect once, freeze what survives and raise the thresholds. Call it once, after
    imports and configuration, before the event loop starts."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(YOUNG_THRESHOLD, *OLDER_THRESHOLDS)
