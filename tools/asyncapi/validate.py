"""Validate docs/asyncapi.yaml against the official AsyncAPI 3.0.0 JSON schema (offline).

The schema is vendored beside this file (asyncapi-3.0.0.schema.json, README.md there says
where it comes from), so `make lint` needs no network. Exit status 1 lists each violation
with its path in the document.

    .venv/bin/python tools/asyncapi/validate.py [docs/asyncapi.yaml]
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import yaml
from jsonschema import Draft7Validator
from referencing import Registry
from referencing.jsonschema import DRAFT7

HERE = Path(__file__).resolve().parent
SCHEMA = HERE / "asyncapi-3.0.0.schema.json"
DOCUMENT = HERE.parents[1] / "docs" / "asyncapi.yaml"


@functools.cache
def _validator() -> Draft7Validator:
    schema = json.loads(SCHEMA.read_text(encoding="utf-8"))
    # The bundled schema names its parts by `$id` (http://asyncapi.com/definitions/...):
    # each is registered, so no reference is ever fetched.
    resources = [(schema["$id"], DRAFT7.create_resource(schema))]
    for part in schema.get("definitions", {}).values():
        if isinstance(part, dict) and "$id" in part:
            resources.append((part["$id"], DRAFT7.create_resource(part)))
    registry: Registry = Registry().with_resources(resources)
    return Draft7Validator(schema, registry=registry)


def violations(document: object) -> list[str]:
    """Every way `document` breaks the AsyncAPI 3.0.0 schema, as `path: message` lines."""
    found = []
    for error in sorted(_validator().iter_errors(document), key=lambda e: list(e.absolute_path)):
        where = "/".join(str(p) for p in error.absolute_path) or "(document)"
        found.append(f"{where}: {error.message[:300]}")
    return found


def main(argv: list[str]) -> int:
    path = Path(argv[0]) if argv else DOCUMENT
    document = yaml.safe_load(path.read_text(encoding="utf-8"))
    if document.get("asyncapi") != "3.0.0":
        print(f"{path}: asyncapi is {document.get('asyncapi')!r}, this checks 3.0.0")
        return 1
    found = violations(document)
    for line in found:
        print(f"{path}: {line}")
    if found:
        return 1
    print(f"{path}: valid AsyncAPI 3.0.0")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
