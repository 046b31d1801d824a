"""What the secure end-to-end suites share: a secret file as an orchestrator mounts it,
and the one line a refused start-up prints."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest


def secret_file(tmp_path_factory: pytest.TempPathFactory, name: str, secret: str) -> Path:
    """`secret` in a file of its own (a line, readable by its owner only)."""
    path = tmp_path_factory.mktemp("secrets") / name
    path.write_text(secret + "\n")
    path.chmod(0o600)
    return path


def failure_line(done: subprocess.CompletedProcess[str], exit_code: int) -> str:
    """The line saying why the command stopped, once it exited with `exit_code`: one
    line of its own (log lines before it, e.g. the fake processor's warning, are not
    failures), and no traceback."""
    assert done.returncode == exit_code, (done.returncode, done.stderr[-2000:])
    assert "Traceback" not in done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("payment-service:")]
    assert len(lines) == 1, lines
    return lines[0]
