"""Settings from an optional TOML file, overridden by PAYMENT_* variables; a secret may
come from a file (`…_FILE`)."""

from __future__ import annotations

import difflib
import os
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

import msgspec

from payment.settings.model import (
    FILE_SUFFIX,
    NON_SETTING_PREFIXES,
    NON_SETTING_VARIABLES,
    PREFIX,
    SECRET_FIELDS,
    ConfigError,
    Settings,
)
from payment.settings.validation import env_name, validate


def known_variables() -> frozenset[str]:
    """Every PAYMENT_* variable that names a setting (a secret's `…_FILE` too)."""
    names = {env_name(f) for f in Settings.__struct_fields__}
    return frozenset(names | {env_name(f) + FILE_SUFFIX for f in SECRET_FIELDS})


def check_unknown_variables(environ: Mapping[str, str]) -> None:
    """Fail on a PAYMENT_* variable that is no setting (a typo), naming the closest one."""
    known = known_variables()
    for name in sorted(environ):
        if (
            not name.startswith(PREFIX)
            or name in known
            or name in NON_SETTING_VARIABLES
            or name.startswith(NON_SETTING_PREFIXES)
        ):
            continue
        close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]}?" if close else " (see the README for every setting)"
        raise ConfigError(f"{name}: unknown setting{hint}")


def _coerce(field: str, raw: Any, annotation: Any) -> Any:
    """Convert a string (env) or TOML value to the field's type, or fail naming the variable."""
    name = env_name(field)
    try:
        if isinstance(raw, str) and field == "kafka_sasl_password" and raw:
            # A password may begin or end with a space: only a file's newline is dropped.
            return raw
        if isinstance(raw, str):
            return msgspec.convert(_parse_scalar(raw, annotation), annotation, strict=False)
        return msgspec.convert(raw, annotation, strict=False)
    except (msgspec.ValidationError, ValueError):
        expected: list[Any] = []
        for arg in getattr(annotation, "__args__", ()):
            if get_origin(arg) is Literal:
                expected.extend(get_args(arg))
            elif arg is not type(None):
                expected.append(arg)
        if annotation in (bool, bool | None):
            hint = "true or false"
        elif expected and all(isinstance(a, str) for a in expected):
            hint = f"one of {', '.join(expected)}"
        elif expected:
            hint = " or ".join(_type_name(a) for a in expected)
        else:
            hint = _type_name(annotation)
        shown = "" if field in SECRET_FIELDS or "key" in field else f" {str(raw)[:60]!r}"
        raise ConfigError(f"{name}: invalid value{shown} (expected {hint})") from None


def _type_name(annotation: Any) -> str:
    return getattr(annotation, "__name__", str(annotation).replace("typing.", ""))


def _parse_scalar(raw: str, annotation: Any) -> Any:
    text = raw.strip()
    if text == "" and "None" in str(annotation):
        return None
    if annotation in (bool, bool | None):
        lowered = text.lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ValueError(text)
    return text


def load_settings(
    environ: Mapping[str, str] | None = None, config_file: str | Path | None = None
) -> Settings:
    """Settings from an optional TOML file, overridden by PAYMENT_* variables; validated."""
    environ = os.environ if environ is None else environ
    check_unknown_variables(environ)
    values: dict[str, Any] = {}
    hints = get_type_hints(Settings)
    types = {f: hints[f] for f in Settings.__struct_fields__}
    if config_file is not None:
        try:
            with open(config_file, "rb") as fh:
                data = tomllib.load(fh)
        except OSError as exc:
            raise ConfigError(f"--config: cannot read {config_file}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"--config: {config_file} is not valid TOML: {exc}") from None
        data = _secrets_from_files(
            data, lambda field: field, lambda field: field + FILE_SUFFIX.lower(), "--config: "
        )
        for key, raw in data.items():
            if key not in types:
                close = difflib.get_close_matches(key, sorted(types), n=1, cutoff=0.6)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise ConfigError(f"--config: unknown setting {key!r} in {config_file}{hint}")
            values[key] = _coerce(key, raw, types[key])
    environ = _secrets_from_files(environ, env_name, lambda field: env_name(field) + FILE_SUFFIX)
    for field, annotation in types.items():
        raw = environ.get(env_name(field))
        if raw is not None:
            values[field] = _coerce(field, raw, annotation)
    settings = Settings(**values)
    validate(settings)
    return settings


def _secrets_from_files(
    source: Mapping[str, Any],
    name_of: Callable[[str], str],
    file_name_of: Callable[[str], str],
    where: str = "",
) -> dict[str, Any]:
    """`source` with each secret's `…_FILE` entry replaced by the file's content.

    A secret given both directly and as a file is an error: which one wins would be a
    guess. One trailing newline (what `echo` and editors add) is not part of the secret.
    """
    resolved = dict(source)
    for field in SECRET_FIELDS:
        name, file_name = name_of(field), file_name_of(field)
        path = resolved.pop(file_name, None)
        if path is None:
            continue
        if name in resolved:
            raise ConfigError(f"{where}{file_name}: {name} is set too; give one of them")
        resolved[name] = read_secret_file(f"{where}{file_name}", str(path))
    return resolved


def read_secret_file(name: str, path: str) -> str:
    """The secret held in the file at `path`, without its trailing newline."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{name}: cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{name}: {path} is not UTF-8 text") from None
    secret = text.removesuffix("\n").removesuffix("\r")
    if not secret.strip():
        raise ConfigError(f"{name}: {path} is empty")
    return secret
