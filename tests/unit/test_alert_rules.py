"""deploy/prometheus/alerts.yaml: valid rules, on series the service exports, each with a
runbook section in docs/operations.md."""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from payment.adapters.observability.metrics import Metrics

ROOT = Path(__file__).parents[2]
RULES = ROOT / "deploy" / "prometheus" / "alerts.yaml"
RULE_TESTS = ROOT / "deploy" / "prometheus" / "alerts_test.yaml"
OPERATIONS = ROOT / "docs" / "operations.md"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not installed (Debian package `prometheus`)"
)


def alerts() -> list[dict[str, Any]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


@needs_promtool
def test_promtool_accepts_the_rules() -> None:
    assert PROMTOOL is not None
    done = subprocess.run(
        [PROMTOOL, "check", "rules", str(RULES)], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr


@needs_promtool
def test_the_alerts_on_absent_and_stale_series_fire_as_written() -> None:
    assert PROMTOOL is not None
    done = subprocess.run(
        [PROMTOOL, "test", "rules", RULE_TESTS.name],
        cwd=RULE_TESTS.parent,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def exported_families() -> set[str]:
    text = asyncio.run(Metrics().render())
    return {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")}


def test_every_series_in_the_rules_is_one_the_service_exports() -> None:
    families = exported_families() | {"up"}
    named: set[str] = set()
    for rule in alerts():
        for name in re.findall(r"\b((?:payment|process)_[a-z_]+)\b", rule["expr"]):
            named.add(re.sub(r"_(bucket|count|sum)$", "", name))
    assert named - families == set()


def test_every_alert_has_a_runbook_section() -> None:
    headings = {
        line.lstrip("#").strip().strip("`")
        for line in OPERATIONS.read_text().splitlines()
        if line.startswith("### ")
    }
    missing = [rule["alert"] for rule in alerts() if rule["alert"] not in headings]
    assert missing == []
    for rule in alerts():
        assert rule["annotations"]["runbook_url"].endswith("#" + rule["alert"].lower())
