"""The cyclic garbage collector set for a long-running service, before it starts.

With CPython's defaults (a young collection every 700 net allocations of container
objects, older generations every 10 of the younger) the collector took 6.4 % of the
service's CPU at 1,000 payments/s (1.51 s of 23.4 s, timed by `gc.callbacks` over a 15 s
warm-up and 20 s measured: 2,424 young, 220 middle and 20 full collections): every full
collection walks every object start-up made (modules, classes, the container), and a
batch keeps thousands of containers alive while it is handled.

So `run` freezes what start-up allocated (`gc.freeze`: never traversed again) and
collects the young generation less often. Reference counting frees almost everything the
handlers make; only reference cycles wait for a collection, a little longer. With these
settings the same run spent 0.04 s in 5 collections; peak RSS was unchanged (102 MB).
docs/performance.md (session 9) has the end-to-end pairs.
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
