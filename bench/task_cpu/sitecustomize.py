"""CPU time per asyncio task in the service: `bench/e2e.py --task-cpu` loads this into it.

Python imports `sitecustomize` at start-up from the path; e2e.py puts this directory first
on the service's PYTHONPATH and names a file in `PAYMENT_BENCH_TASK_CPU`. Nothing happens
without that variable. Every callback the event loop runs (`asyncio.events.Handle._run`,
a private function: a measuring tool only) adds its thread CPU time to what it ran: a
task's coroutine by qualified name, or a plain callback; the loop's wait for I/O (the
selector) is counted apart. Each SIGUSR2 appends the totals so far to the file as one JSON
line, so the difference between two lines is what a measured step cost. Unlike a sampling
profiler, time the service spends runnable without a CPU counts nowhere.
"""

from __future__ import annotations

import os

_OUTPUT = os.environ.get("PAYMENT_BENCH_TASK_CPU")

if _OUTPUT:
    import asyncio.events
    import json
    import selectors
    import signal
    import time
    from collections import Counter
    from typing import Any

    _cpu_ms: Counter[str] = Counter()
    _runs: Counter[str] = Counter()
    _handle_run = asyncio.events.Handle._run
    _select = selectors.DefaultSelector.select

    def _name(handle: asyncio.events.Handle) -> str:
        callback: Any = handle._callback
        get_coro = getattr(getattr(callback, "__self__", None), "get_coro", None)
        if get_coro is not None:
            coro = get_coro()
            return f"task {getattr(coro, '__qualname__', None) or type(coro).__name__}"
        return f"callback {getattr(callback, '__qualname__', None) or type(callback).__name__}"

    def _timed_run(self: asyncio.events.Handle) -> None:
        name = _name(self)  # before: a task that finishes lets go of its coroutine
        started = time.thread_time()
        try:
            _handle_run(self)
        finally:
            _cpu_ms[name] += (time.thread_time() - started) * 1000.0
            _runs[name] += 1

    def _timed_select(self: selectors.BaseSelector, timeout: float | None = None) -> Any:
        started = time.thread_time()
        try:
            return _select(self, timeout)  # type: ignore[arg-type]
        finally:
            _cpu_ms["the loop's wait for I/O"] += (time.thread_time() - started) * 1000.0

    def _dump(*_: object) -> None:
        line = {"cpu_s": time.process_time(), "cpu_ms": _cpu_ms, "runs": _runs}
        with open(_OUTPUT, "a", encoding="utf-8") as out:
            out.write(json.dumps(line) + "\n")

    asyncio.events.Handle._run = _timed_run  # type: ignore[method-assign]
    selectors.DefaultSelector.select = _timed_select  # type: ignore[method-assign]
    signal.signal(signal.SIGUSR2, _dump)
