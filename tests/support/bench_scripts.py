"""The bench scripts (bench/*.py), loaded as modules for the tests of their bookkeeping."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

# The bench scripts import their helpers as top-level modules (benchlib, timeline, ...).
BENCH = Path(__file__).resolve().parents[2] / "bench"


def load_bench_script(script: str) -> ModuleType:
    """bench/`script`.py under a name of its own (tests/e2e is a package named `e2e`)."""
    if str(BENCH) not in sys.path:
        sys.path.append(str(BENCH))
    name = f"bench_{script}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{script}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while being made
    spec.loader.exec_module(module)
    return module
