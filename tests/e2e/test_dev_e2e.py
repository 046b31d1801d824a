"""`payment-service dev`: the README's first command's code path, with nothing configured."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from support.waiting import eventually_sync

SERVICE = str(Path(sys.executable).with_name("payment-service"))
pytestmark = pytest.mark.slow


def _bare_env(tmp_path: Path) -> dict[str, str]:
    """The caller's environment without any PAYMENT_* setting, and a private data dir."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PAYMENT_")}
    env["XDG_DATA_HOME"] = str(tmp_path / "data")
    # Only the health port is chosen, so parallel runs of the suite do not collide on 8080.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        env["PAYMENT_HTTP_PORT"] = str(s.getsockname()[1])
    return env


def _children_of_data_dir(data_home: Path) -> list[str]:
    """Command lines of live processes that belong to this run's embedded parts."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if str(data_home) in cmdline:
            found.append(cmdline)
    return found


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _wait_all_gone(data_home: Path, ports: list[int]) -> None:
    """Until no process of this run's embedded parts is left and none of `ports` listens:
    they were told to stop, the wait is for the kernel to be done with them (at most 10 s)."""
    eventually_sync(
        lambda: not _children_of_data_dir(data_home) and not any(_listening(p) for p in ports),
        10,
        what="the embedded processes gone and their ports closed",
    )


def _ports(output: str) -> list[int]:
    return [int(p) for p in re.findall(r"listening on \S*?127\.0\.0\.1:(\d+)", output)]


@pytest.mark.parametrize(
    "broker", [[], ["--broker", "kafka"]], ids=["tansu-default", "apache-kafka"]
)
def test_dev_demo_runs_every_request_to_a_terminal_event_and_leaves_nothing(
    tmp_path: Path, broker: list[str]
) -> None:
    env = _bare_env(tmp_path)
    done = subprocess.run(
        [SERVICE, "dev", "--fresh", *broker, "--demo", "20"],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    assert re.search(r"completed\s+20\b", output), output[-4000:]
    assert re.search(r"no outcome\s+0\b", output), output[-4000:]
    assert re.search(r"result\s+OK", output), output[-4000:]
    ports = _ports(output)
    assert len(ports) == 2, output[:2000]  # one line each: PostgreSQL and the broker
    _wait_all_gone(tmp_path / "data", ports)
    assert _children_of_data_dir(tmp_path / "data") == []
    assert [p for p in ports if _listening(p)] == []


def test_dev_stops_everything_it_started_on_sigterm(tmp_path: Path) -> None:
    env = _bare_env(tmp_path)
    proc = subprocess.Popen(
        [SERVICE, "dev"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "consuming" in line:
                break
        assert any("consuming" in line for line in lines), "".join(lines)
        ports = _ports("".join(lines))
        assert len(ports) == 2, "".join(lines)
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, "".join(lines) + rest
    _wait_all_gone(tmp_path / "data", ports)
    assert _children_of_data_dir(tmp_path / "data") == []
    assert [p for p in ports if _listening(p)] == []


def test_dev_on_kafka_without_java_says_so_in_one_line(tmp_path: Path) -> None:
    env = _bare_env(tmp_path)
    env["PATH"] = str(tmp_path / "empty-bin")  # no java, no mvn
    (tmp_path / "empty-bin").mkdir()
    env["PAYMENT_KAFKA_CACHE_DIR"] = str(tmp_path / "cache")  # nothing resolved yet
    done = subprocess.run(
        [SERVICE, "dev", "--broker", "kafka"], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 3, done.stdout + done.stderr
    errors = done.stderr.strip().splitlines()
    assert len(errors) == 1 and "`java`" in errors[0], done.stderr
    assert "Traceback" not in done.stdout + done.stderr
    _wait_all_gone(tmp_path / "data", [])
    assert _children_of_data_dir(tmp_path / "data") == []
