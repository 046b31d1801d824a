"""Kafka security settings and secrets read from files (issue 18)."""

from __future__ import annotations

from pathlib import Path

import pytest

from payment.settings import ConfigError, load_settings

SASL = {
    "PAYMENT_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
    "PAYMENT_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
    "PAYMENT_KAFKA_SASL_USERNAME": "payments",
}


def _secret_file(tmp_path: Path, text: str, name: str = "secret") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_defaults_are_plaintext_with_hostname_verification() -> None:
    s = load_settings({})
    assert s.kafka_security_protocol == "PLAINTEXT"
    assert s.kafka_sasl_mechanism is None
    assert s.kafka_ssl_check_hostname is True


@pytest.mark.parametrize(
    ("field", "variable"),
    [
        ("database_url", "PAYMENT_DATABASE_URL"),
        ("stripe_api_key", "PAYMENT_STRIPE_API_KEY"),
        ("kafka_sasl_password", "PAYMENT_KAFKA_SASL_PASSWORD"),
    ],
)
def test_each_secret_reads_from_a_file_without_its_trailing_newline(
    tmp_path: Path, field: str, variable: str
) -> None:
    value = {
        "database_url": "postgresql://app:s3cr3t@db.example:5432/payments",
        "stripe_api_key": "sk_test_abc123",
        "kafka_sasl_password": "p@ss word\twith spaces ",
    }[field]
    env = {variable + "_FILE": _secret_file(tmp_path, value + "\n")}
    if field == "kafka_sasl_password":
        env |= {**SASL, "PAYMENT_KAFKA_SASL_PASSWORD_FILE": env.pop(variable + "_FILE")}
    if field == "stripe_api_key":
        env["PAYMENT_PROCESSOR"] = "sandbox"
    assert getattr(load_settings(env), field) == value


def test_a_crlf_line_ending_is_not_part_of_the_secret(tmp_path: Path) -> None:
    env = {**SASL, "PAYMENT_KAFKA_SASL_PASSWORD_FILE": _secret_file(tmp_path, "pw\r\n")}
    assert load_settings(env).kafka_sasl_password == "pw"


def test_a_secret_given_both_ways_is_a_configuration_error(tmp_path: Path) -> None:
    env = {
        "PAYMENT_STRIPE_API_KEY": "sk_test_direct",
        "PAYMENT_STRIPE_API_KEY_FILE": _secret_file(tmp_path, "sk_test_fromfile"),
    }
    with pytest.raises(ConfigError) as raised:
        load_settings(env)
    message = str(raised.value)
    assert message.startswith("PAYMENT_STRIPE_API_KEY_FILE:")
    assert "PAYMENT_STRIPE_API_KEY is set too" in message
    assert "sk_test_direct" not in message and "sk_test_fromfile" not in message


@pytest.mark.parametrize("content", [None, "", "\n"])
def test_a_missing_or_empty_secret_file_names_the_variable(
    tmp_path: Path, content: str | None
) -> None:
    path = tmp_path / "absent"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError, match=r"^PAYMENT_DATABASE_URL_FILE: .*absent"):
        load_settings({"PAYMENT_DATABASE_URL_FILE": str(path)})


def test_the_toml_file_takes_secret_files_too(tmp_path: Path) -> None:
    secret = _secret_file(tmp_path, "postgresql://app:pw@db:5432/x\n")
    config = tmp_path / "payment.toml"
    config.write_text(f'database_url_file = "{secret}"\n')
    assert load_settings({}, config).database_url == "postgresql://app:pw@db:5432/x"
    config.write_text(f'database_url_file = "{secret}"\ndatabase_url = "postgresql://h/x"\n')
    with pytest.raises(ConfigError, match=r"^--config: database_url_file: database_url is set"):
        load_settings({}, config)


def test_the_environment_wins_over_the_toml_file_for_secrets(tmp_path: Path) -> None:
    config = tmp_path / "payment.toml"
    config.write_text('database_url = "postgresql://toml/x"\n')
    env = {"PAYMENT_DATABASE_URL_FILE": _secret_file(tmp_path, "postgresql://env/x")}
    assert load_settings(env, config).database_url == "postgresql://env/x"


def test_sasl_needs_mechanism_username_and_password() -> None:
    for missing in ("PAYMENT_KAFKA_SASL_MECHANISM", "PAYMENT_KAFKA_SASL_USERNAME"):
        env = {**SASL, "PAYMENT_KAFKA_SASL_PASSWORD": "pw"}
        del env[missing]
        with pytest.raises(ConfigError, match=f"^{missing}: required when"):
            load_settings(env)
    with pytest.raises(ConfigError, match=r"^PAYMENT_KAFKA_SASL_PASSWORD: required when"):
        load_settings(SASL)


def test_credentials_the_protocol_would_ignore_are_refused() -> None:
    env = {"PAYMENT_KAFKA_SASL_USERNAME": "u", "PAYMENT_KAFKA_SASL_PASSWORD": "hunter2"}
    with pytest.raises(ConfigError) as raised:
        load_settings(env)
    assert str(raised.value).startswith("PAYMENT_KAFKA_SASL_USERNAME: set, but")
    with pytest.raises(ConfigError, match=r"^PAYMENT_KAFKA_SSL_CAFILE: set, but .*SASL_PLAINTEXT"):
        load_settings(
            {
                **SASL,
                "PAYMENT_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
                "PAYMENT_KAFKA_SASL_PASSWORD": "pw",
                "PAYMENT_KAFKA_SSL_CAFILE": "/etc/hostname",
            }
        )
    with pytest.raises(ConfigError, match=r"^PAYMENT_KAFKA_SSL_CHECK_HOSTNAME: set, but"):
        load_settings({"PAYMENT_KAFKA_SSL_CHECK_HOSTNAME": "false"})


def test_unknown_protocol_or_mechanism_names_the_variable() -> None:
    with pytest.raises(ConfigError, match=r"^PAYMENT_KAFKA_SECURITY_PROTOCOL: invalid value"):
        load_settings({"PAYMENT_KAFKA_SECURITY_PROTOCOL": "TLS"})
    with pytest.raises(ConfigError, match=r"^PAYMENT_KAFKA_SASL_MECHANISM: invalid value"):
        load_settings({**SASL, "PAYMENT_KAFKA_SASL_MECHANISM": "GSSAPI"})


def test_unreadable_certificate_files_are_named(tmp_path: Path) -> None:
    env = {"PAYMENT_KAFKA_SECURITY_PROTOCOL": "SSL"}
    with pytest.raises(ConfigError, match=r"^PAYMENT_KAFKA_SSL_CAFILE: cannot read"):
        load_settings({**env, "PAYMENT_KAFKA_SSL_CAFILE": str(tmp_path / "nope.pem")})
    with pytest.raises(ConfigError, match=r"^PAYMENT_KAFKA_SSL_KEYFILE: set without"):
        load_settings({**env, "PAYMENT_KAFKA_SSL_KEYFILE": "/etc/hostname"})


def test_repr_shows_no_secret(tmp_path: Path) -> None:
    s = load_settings(
        {
            **SASL,
            "PAYMENT_KAFKA_SASL_PASSWORD": "kafka-pw-123",
            "PAYMENT_DATABASE_URL": "postgresql://app:db-pw-456@db:5432/x",
            "PAYMENT_PROCESSOR": "sandbox",
            "PAYMENT_STRIPE_API_KEY": "sk_test_stripe789",
        }
    )
    shown = repr(s)
    for secret in ("kafka-pw-123", "db-pw-456", "sk_test_stripe789"):
        assert secret not in shown
    assert "kafka_sasl_username" in shown
