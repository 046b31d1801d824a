"""The hexagon's import rules, checked mechanically: import-linter contracts and the domain AST."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOMAIN = ROOT / "src" / "payment" / "domain"
# Standard-library modules that would give the domain I/O, concurrency or a process.
STDLIB_BUT_NOT_IN_THE_DOMAIN = {
    "asyncio",
    "http",
    "multiprocessing",
    "os",
    "selectors",
    "shutil",
    "socket",
    "sqlite3",
    "ssl",
    "subprocess",
    "threading",
    "urllib",
}


def test_import_linter_contracts_in_pyproject_are_kept() -> None:
    lint_imports = Path(sys.executable).with_name("lint-imports")
    assert lint_imports.exists(), f"import-linter is not installed next to {sys.executable}"

    run = subprocess.run(
        [str(lint_imports), "--no-cache", "--no-logo", str(ROOT / "pyproject.toml")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )

    report = run.stdout + run.stderr
    assert run.returncode == 0, report
    kept = re.search(r"Contracts: (\d+) kept, (\d+) broken", report)
    assert kept is not None, report
    assert int(kept.group(1)) >= 2 and kept.group(2) == "0", report


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in a module of package payment.domain."""
    package = list(path.relative_to(ROOT / "src").parent.parts)
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                module = ".".join([*base, *([node.module] if node.module else [])])
            else:
                module = node.module or ""
            found.append((node.lineno, module))
    return found


def _allowed(module: str) -> bool:
    top = module.split(".")[0]
    if module == "payment.domain" or module.startswith("payment.domain."):
        return True
    if top == "msgspec" or top == "__future__":
        return True
    return top in sys.stdlib_module_names and top not in STDLIB_BUT_NOT_IN_THE_DOMAIN


DOMAIN_MODULES = sorted(DOMAIN.rglob("*.py"))


def test_the_domain_has_modules_to_check() -> None:
    assert {p.name for p in DOMAIN_MODULES} >= {"money.py", "payment.py", "events.py"}


@pytest.mark.parametrize("path", DOMAIN_MODULES, ids=lambda p: p.name)
def test_the_domain_imports_only_stdlib_msgspec_and_itself(path: Path) -> None:
    offending = [f"{path.name}:{line} imports {m}" for line, m in _imports(path) if not _allowed(m)]

    assert not offending, "\n".join(offending)


@pytest.mark.parametrize(
    ("module", "allowed"),
    [
        ("uuid", True),
        ("collections.abc", True),
        ("msgspec.json", True),
        ("payment.domain.money", True),
        ("payment.application.ports", False),
        ("payment.adapters.memory", False),
        ("payment", False),
        ("psycopg", False),
        ("asyncio", False),
        ("socket", False),
    ],
)
def test_the_domain_rule_tells_allowed_from_forbidden(module: str, allowed: bool) -> None:
    assert _allowed(module) is allowed
