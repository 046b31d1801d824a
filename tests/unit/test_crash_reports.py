"""A fatal signal in the service's process leaves the Python stacks on standard error.

Each case runs in a fresh interpreter (pytest keeps its own fault handler enabled in this
one), without PYTHONFAULTHANDLER unless the case sets it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

CRASHING = textwrap.dedent(
    """
    import os, signal
    from payment.runtime.crash_reports import report_native_crashes

    def charging_when_the_fault_comes():
        os.kill(os.getpid(), signal.SIGSEGV)

    print("enabled:", report_native_crashes(), flush=True)
    charging_when_the_fault_comes()
    """
)


def _python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if k != "PYTHONFAULTHANDLER"}
    environment.update(env)
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=environment,
    )


def test_a_segmentation_fault_dumps_where_python_was_and_still_ends_the_process() -> None:
    crashed = _python(CRASHING)

    assert crashed.stdout == "enabled: True\n"
    assert crashed.returncode == -signal.SIGSEGV
    assert "Fatal Python error: Segmentation fault" in crashed.stderr
    assert "in charging_when_the_fault_comes" in crashed.stderr


def test_without_it_the_same_fault_leaves_no_stack() -> None:
    crashed = _python(CRASHING.replace("report_native_crashes()", "False"))

    assert crashed.returncode == -signal.SIGSEGV
    assert "charging_when_the_fault_comes" not in crashed.stderr


def test_a_handler_already_enabled_by_the_environment_is_kept() -> None:
    crashed = _python(CRASHING, PYTHONFAULTHANDLER="1")

    assert crashed.stdout == "enabled: True\n"
    assert crashed.stderr.count("Fatal Python error: Segmentation fault") == 1
    assert "in charging_when_the_fault_comes" in crashed.stderr


def test_a_standard_error_without_a_file_descriptor_is_no_error() -> None:
    code = textwrap.dedent(
        """
        import io, sys
        from payment.runtime.crash_reports import report_native_crashes

        sys.stderr = io.StringIO()
        first = report_native_crashes()
        sys.stderr = None
        print(first, report_native_crashes())
        """
    )
    answered = _python(code)

    assert answered.returncode == 0, answered.stderr
    assert answered.stdout == "False False\n"


def test_dev_runs_the_service_with_the_stacks_reported_too() -> None:
    # `dev` runs the service in its own process (embedded PostgreSQL and broker beside
    # it); a fault there, here stood in by run_dev, must leave the stacks as under `run`.
    crashed = _python(
        textwrap.dedent(
            """
            import argparse, os, signal
            import payment.devtools.devmode as devmode
            from payment.cli.running import command
            from payment.settings import Settings

            def serving_in_dev_when_the_fault_comes(settings, **options):
                os.kill(os.getpid(), signal.SIGSEGV)

            devmode.run_dev = serving_in_dev_when_the_fault_comes
            args = argparse.Namespace(command="dev", fresh=False, demo=0, broker="tansu")
            command(Settings(), args)
            """
        )
    )

    assert crashed.returncode == -signal.SIGSEGV
    assert "in serving_in_dev_when_the_fault_comes" in crashed.stderr
