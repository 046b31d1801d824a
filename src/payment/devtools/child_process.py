"""Child processes for the development servers: launched, watched, stopped as a group."""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import IO, Self

LOOPBACK = "127.0.0.1"
INSTALL_HINT = "pip install 'payment-service[embedded]'"
_ANSI_ESCAPE = re.compile(rb"\x1b\[[0-9;]*[A-Za-z]")
_PR_SET_PDEATHSIG = 1


class EmbeddedError(RuntimeError):
    """Base class of the errors raised by the embedded processes."""


class EmbeddedExtraMissing(EmbeddedError):
    """The optional `embedded` extra, which ships the binaries, is not installed."""


class EmbeddedStartError(EmbeddedError):
    """The child process exited or did not accept connections in time."""


def free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def _die_with_parent(death_signal: signal.Signals) -> Callable[[], None] | None:
    """Return a preexec_fn asking Linux to signal the child when this process dies."""
    if not sys.platform.startswith("linux"):
        return None
    # Loaded before fork: the child must not do anything between fork and exec that
    # could take a lock another thread of the parent held at fork time.
    libc = ctypes.CDLL(None, use_errno=True)
    parent = os.getpid()

    def preexec() -> None:
        libc.prctl(_PR_SET_PDEATHSIG, int(death_signal), 0, 0, 0)
        # The parent may have died between fork and prctl, and then no signal comes.
        if os.getppid() != parent:
            os.kill(os.getpid(), int(death_signal))

    return preexec


# PR_SET_PDEATHSIG fires when the *thread* that forked the child exits, not the process.
# `start()` may run in a worker thread (asyncio.to_thread, a test helper's thread), so
# every child is forked by this one daemon thread, which lives as long as the process.
_spawn_queue: queue.SimpleQueue[
    tuple[Callable[[], subprocess.Popen[bytes]], concurrent.futures.Future[subprocess.Popen[bytes]]]
] = queue.SimpleQueue()
_spawn_lock = threading.Lock()
_spawn_thread: threading.Thread | None = None


def _spawn_loop() -> None:
    while True:
        launch, future = _spawn_queue.get()
        try:
            future.set_result(launch())
        except BaseException as exc:  # handed to the caller, which re-raises it
            future.set_exception(exc)


def _spawn(launch: Callable[[], subprocess.Popen[bytes]]) -> subprocess.Popen[bytes]:
    global _spawn_thread
    with _spawn_lock:
        if _spawn_thread is None:
            _spawn_thread = threading.Thread(
                target=_spawn_loop, name="embedded-process-spawner", daemon=True
            )
            _spawn_thread.start()
    future: concurrent.futures.Future[subprocess.Popen[bytes]] = concurrent.futures.Future()
    _spawn_queue.put((launch, future))
    return future.result()


class ChildProcess:
    """One long-running child in its own session, its output kept in an anonymous file."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def new_log(self) -> IO[bytes]:
        if self._log is not None:
            self._log.close()
        # Lives as long as the child writes to it, so no `with`.
        self._log = tempfile.TemporaryFile(prefix=f"{self._name}-", suffix=".log")  # noqa: SIM115
        return self._log

    def launch(
        self,
        args: list[str],
        *,
        death_signal: signal.Signals,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        user: int | None = None,
        group: int | None = None,
    ) -> None:
        log = self.new_log()
        extra_groups: list[int] | None = [] if user is not None else None

        def launch() -> subprocess.Popen[bytes]:
            return subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=cwd,
                user=user,
                group=group,
                extra_groups=extra_groups,
                # Its own session: a Ctrl-C in the terminal reaches only us, and we
                # shut the child down in order instead of racing it.
                start_new_session=True,
                preexec_fn=_die_with_parent(death_signal),
            )

        self._process = _spawn(launch)

    def tail(self, lines: int = 30) -> str:
        if self._log is None:
            return ""
        fd = self._log.fileno()
        size = os.fstat(fd).st_size
        # pread leaves the offset the child shares with us untouched.
        chunk = os.pread(fd, min(size, 64 * 1024), max(0, size - 64 * 1024))
        text = _ANSI_ESCAPE.sub(b"", chunk).decode("utf-8", "replace")
        return "\n".join(text.splitlines()[-lines:])

    def failure(self, message: str) -> EmbeddedStartError:
        output = self.tail()
        detail = f"\n--- last lines of {self._name} output ---\n{output}" if output else ""
        return EmbeddedStartError(f"{self._name}: {message}{detail}")

    def check_alive(self) -> None:
        if self._process is not None and self._process.poll() is not None:
            raise self.failure(f"exited with status {self._process.returncode} while starting")

    def stop(self, graceful: signal.Signals, timeout: float) -> None:
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            self._signal_group(process, graceful)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                self._signal_group(process, signal.SIGKILL)
                process.wait()
        else:
            # The leader is gone but anything it left in its session must go too.
            self._signal_group(process, signal.SIGKILL)
        self._process = None

    @staticmethod
    def _signal_group(process: subprocess.Popen[bytes], sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)


def wait_until(child: ChildProcess, ready: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while True:
        child.check_alive()
        if ready():
            return
        if time.monotonic() >= deadline:
            raise child.failure(f"did not {what} within {timeout:g} s")
        time.sleep(0.05)


class SupervisedProcess:
    """A server run as a child process (`ChildProcess`): started by entering a `with`
    block, closed by leaving it. Subclasses start and stop it; `close` stops it and
    cleans up (by default it only stops)."""

    _child: ChildProcess
    _host: str
    _port: int | None

    @property
    def pid(self) -> int | None:
        """Process id of the server, or None when stopped."""
        return self._child.pid

    @property
    def running(self) -> bool:
        return self._child.running

    def start(self, timeout: float) -> None:
        raise NotImplementedError

    def stop(self, timeout: float) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self.stop()  # type: ignore[call-arg]  # each subclass's stop has its own default

    def log_tail(self, lines: int = 30) -> str:
        """The last lines the server printed, for diagnostics."""
        return self._child.tail(lines)

    def _address(self, what: str) -> str:
        """`host:port` of the running server; EmbeddedError naming `what` if it is not."""
        if self._port is None or not self._child.running:
            raise EmbeddedError(f"{what} is not running")
        return f"{self._host}:{self._port}"

    def _wait_started(self, ready: Callable[[], bool], timeout: float, what: str) -> None:
        """Wait until `ready()`; on failure, or interrupted, stop the child and re-raise."""
        try:
            wait_until(self._child, ready, timeout, what)
        except BaseException:
            self._abandon()
            raise

    def _abandon(self) -> None:
        self.stop()  # type: ignore[call-arg]

    def __enter__(self) -> Self:
        self.start()  # type: ignore[call-arg]
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
