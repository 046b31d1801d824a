"""docs/asyncapi.yaml is valid AsyncAPI 3.0.0, by the official JSON schema (tools/asyncapi)."""

from __future__ import annotations

import copy
import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def validate() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "asyncapi_validate", ROOT / "tools" / "asyncapi" / "validate.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def document() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((ROOT / "docs" / "asyncapi.yaml").read_text())
    return loaded


def test_the_published_contract_is_valid_asyncapi_3(
    validate: ModuleType, document: dict[str, Any]
) -> None:
    assert validate.violations(document) == []
    assert validate.main([str(ROOT / "docs" / "asyncapi.yaml")]) == 0


def test_the_check_finds_what_breaks_the_schema(
    validate: ModuleType, document: dict[str, Any]
) -> None:
    broken = copy.deepcopy(document)
    del broken["info"]["title"]
    operation = next(iter(broken["operations"].values()))
    operation["action"] = "publish"  # AsyncAPI 2's word; 3.0 says send or receive
    found = validate.violations(broken)
    assert any(line.startswith("info:") and "'title'" in line for line in found), found
    assert any(line.startswith("operations/") for line in found), found
