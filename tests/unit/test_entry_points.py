"""`python -m payment` is the `payment-service` command: same version, same help."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from payment.adapters.observability.metrics import package_version


def _run(*command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)


def _console_script() -> str:
    beside = Path(sys.executable).with_name("payment-service")
    found = str(beside) if beside.exists() else shutil.which("payment-service")
    assert found is not None, "payment-service is not installed (pip install -e .)"
    return found


def test_python_dash_m_payment_prints_the_same_version_as_the_console_script() -> None:
    module = _run(sys.executable, "-m", "payment", "--version")
    script = _run(_console_script(), "--version")

    assert (module.returncode, script.returncode) == (0, 0)
    assert module.stdout == script.stdout == f"payment-service {package_version()}\n"


def test_python_dash_m_payment_is_the_same_command_line() -> None:
    module = _run(sys.executable, "-m", "payment", "--help")
    script = _run(_console_script(), "--help")

    assert module.returncode == 0
    assert module.stdout == script.stdout
    assert module.stdout.startswith("usage: payment-service ")
    # Without a command it fails as the console script does: usage on stderr, exit 2.
    bare = _run(sys.executable, "-m", "payment")
    assert bare.returncode == 2
    assert "the following arguments are required: COMMAND" in bare.stderr
