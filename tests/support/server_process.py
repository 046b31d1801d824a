"""A test server in a child process: started, probed until it answers, stopped."""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from typing import IO

import httpx


class ServerProcess:
    """One child process serving HTTP for a test (a fake gateway, an emulator).

    Its stderr goes to a file, not a pipe: a server that logs every request would fill a
    pipe nobody reads and freeze mid-test.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def start(
        self,
        argv: Sequence[str],
        *,
        probe: Callable[[], object],
        timeout_s: float,
        env: Mapping[str, str] | None = None,
    ) -> None:
        """Start `argv` and return once `probe()` gets an HTTP answer (it raises
        `httpx.TransportError` until then); raise if the process exits or stays silent."""
        self._log = tempfile.TemporaryFile()  # noqa: SIM115 - closed by stop()
        self._process = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=self._log,
            env=None if env is None else dict(env),
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                err = self.log_text()
                self.stop()
                raise RuntimeError(f"{self.name} exited at start-up: {err[-2000:]}")
            try:
                probe()
                return
            except httpx.TransportError:
                time.sleep(0.05)
        err = self.log_text()
        self.stop()
        raise RuntimeError(
            f"{self.name} did not answer in {timeout_s}s ({' '.join(argv)}): {err[-2000:]}"
        )

    def stop(self) -> None:
        """Terminate the process (kill it if it lingers) and close its log; idempotent."""
        process, self._process = self._process, None
        log, self._log = self._log, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
        if log is not None:
            log.close()

    def log_text(self) -> str:
        """What the process wrote to stderr so far."""
        if self._log is None:
            return ""
        # pread: the child writes through the same file offset, which a seek would move.
        fd = self._log.fileno()
        return os.pread(fd, os.fstat(fd).st_size, 0).decode(errors="replace")
