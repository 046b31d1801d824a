"""Day-one safety: what `run` and `dev` choose, typos caught, one-line start-up failures."""

from __future__ import annotations

import asyncio

import psycopg
import pytest
from aiokafka import errors as kafka_errors

from payment.adapters.kafka.topics import topic_problem
from payment.adapters.observability.metrics import Metrics
from payment.adapters.startup import broker_failure, database_failure
from payment.cli import _parser
from payment.settings import ConfigError, Settings, dev_defaults, load_settings, run_defaults

URL = "postgresql://payments:s3cret@db.internal:5432/payments"


# -- the processor ------------------------------------------------------------------------


def test_run_refuses_to_start_without_a_chosen_processor() -> None:
    settings = load_settings({"PAYMENT_DATABASE_URL": URL})
    assert settings.processor is None
    with pytest.raises(ConfigError, match=r"^PAYMENT_PROCESSOR: required by run"):
        run_defaults(settings)


def test_dev_chooses_the_fake_and_run_keeps_what_was_chosen() -> None:
    assert dev_defaults(Settings()).processor == "fake"
    assert run_defaults(Settings(processor="fake")).processor == "fake"
    chosen = Settings(processor="stripe", stripe_api_key="sk_live_x")
    assert dev_defaults(chosen).processor == "stripe"


# -- unknown variables ------------------------------------------------------------------


def test_a_misspelt_variable_is_a_configuration_error_naming_the_closest_setting() -> None:
    with pytest.raises(ConfigError) as raised:
        load_settings({"PAYMENT_PROCESOR": "stripe"})
    assert str(raised.value) == "PAYMENT_PROCESOR: unknown setting; did you mean PAYMENT_PROCESSOR?"


def test_an_unknown_variable_far_from_any_setting_points_at_the_readme() -> None:
    with pytest.raises(ConfigError, match=r"PAYMENT_ZZZ: unknown setting \(see the README"):
        load_settings({"PAYMENT_ZZZ": "1"})


def test_variables_of_tools_tests_and_benchmarks_are_not_settings_and_are_allowed() -> None:
    load_settings(
        {
            "PAYMENT_FAILPOINTS": "after_charge@3",
            "PAYMENT_KAFKA_CACHE_DIR": "/tmp/k",
            "PAYMENT_TEST_DATABASE_URL": URL,
            "PAYMENT_BENCH_BROKER": "kafka",
            "OTHER_PROCESOR": "x",
        }
    )


def test_a_misspelt_key_in_the_config_file_names_the_closest_setting(tmp_path: object) -> None:
    from pathlib import Path

    path = Path(str(tmp_path)) / "payment.toml"
    path.write_text('procesor = "fake"\n')
    with pytest.raises(ConfigError, match="did you mean 'processor'"):
        load_settings({}, config_file=path)


# -- migrations and topics: what each command decides --------------------------------------


def test_run_neither_migrates_nor_creates_topics_unless_told_and_replicates_by_three() -> None:
    s = run_defaults(Settings(processor="fake"))
    assert (s.migrate_on_start, s.kafka_create_topics) == (False, False)
    assert (s.kafka_replication_factor, s.kafka_min_insync_replicas) == (3, 2)


def test_dev_migrates_and_creates_topics_on_one_node() -> None:
    s = dev_defaults(Settings())
    assert (s.migrate_on_start, s.kafka_create_topics) == (True, True)
    assert (s.kafka_replication_factor, s.kafka_min_insync_replicas) == (1, 1)


def test_explicit_choices_win_over_the_commands_defaults() -> None:
    s = load_settings(
        {
            "PAYMENT_PROCESSOR": "fake",
            "PAYMENT_MIGRATE_ON_START": "yes",
            "PAYMENT_KAFKA_CREATE_TOPICS": "true",
            "PAYMENT_KAFKA_REPLICATION_FACTOR": "5",
            "PAYMENT_KAFKA_MIN_INSYNC_REPLICAS": "3",
        }
    )
    s = run_defaults(s)
    assert (s.migrate_on_start, s.kafka_create_topics) == (True, True)
    assert (s.kafka_replication_factor, s.kafka_min_insync_replicas) == (5, 3)
    assert dev_defaults(Settings(migrate_on_start=False)).migrate_on_start is False


def test_min_insync_replicas_above_the_replication_factor_is_refused() -> None:
    with pytest.raises(ConfigError, match="PAYMENT_KAFKA_MIN_INSYNC_REPLICAS: 3 exceeds"):
        load_settings(
            {"PAYMENT_KAFKA_REPLICATION_FACTOR": "2", "PAYMENT_KAFKA_MIN_INSYNC_REPLICAS": "3"}
        )
    # The default minimum (2) with a replication factor of 1 is refused too, at `run`.
    with pytest.raises(ConfigError, match="PAYMENT_KAFKA_MIN_INSYNC_REPLICAS"):
        run_defaults(Settings(processor="fake", kafka_replication_factor=1))


def _topic(name: str, partitions: int, error_code: int = 0) -> dict[str, object]:
    return {
        "topic": name,
        "error_code": error_code,
        "partitions": [{"partition": p, "leader": 1, "error_code": 0} for p in range(partitions)],
    }


def test_existing_topics_with_one_partition_count_are_usable() -> None:
    assert topic_problem(["a", "b"], [_topic("a", 6), _topic("b", 6)]) is None


def test_missing_topics_are_named_with_how_to_fix_it() -> None:
    problem = topic_problem(["a", "b", "c"], [_topic("a", 6), _topic("b", 0, error_code=3)])
    assert problem is not None
    assert problem.startswith("topics missing: b, c:")
    assert "PAYMENT_KAFKA_CREATE_TOPICS=true" in problem


def test_topics_with_different_partition_counts_are_refused() -> None:
    problem = topic_problem(["a", "b"], [_topic("a", 6), _topic("b", 3)])
    assert problem is not None and "different partition counts (a 6, b 3)" in problem


def test_topics_the_principal_may_not_describe_name_the_acls() -> None:
    problem = topic_problem(["a"], [_topic("a", 0, error_code=29)])
    assert problem is not None and "DESCRIBE, READ and WRITE" in problem


# -- one-line failures ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        (
            'connection failed: connection to server at "10.0.0.5", port 5432 failed:'
            " Connection refused\n\tIs the server running on that host?",
            "connection refused",
        ),
        ('FATAL:  password authentication failed for user "payments"', "credentials refused"),
        ('FATAL:  role "payments" does not exist', "credentials refused"),
        ('FATAL:  database "payments" does not exist', "database 'payments' does not exist"),
        ("failed to resolve host 'db.internal': Name or service not known", "host name not found"),
    ],
)
def test_a_database_failure_is_one_line_with_the_address_and_no_password(
    message: str, expected: str
) -> None:
    line = database_failure(psycopg.OperationalError(message), URL)
    assert "\n" not in line
    assert line.startswith("database payments@db.internal:5432/payments: ")
    assert expected in line
    assert "s3cret" not in line
    assert "PAYMENT_DATABASE_URL" in line


def test_a_broker_failure_is_one_line_naming_the_servers() -> None:
    line = broker_failure(kafka_errors.KafkaConnectionError("Unable to bootstrap"), "k1:9092")
    assert line.startswith("Kafka k1:9092: cannot connect (KafkaConnectionError)")
    assert "PAYMENT_KAFKA_BOOTSTRAP_SERVERS" in line
    denied = broker_failure(kafka_errors.GroupAuthorizationFailedError(), "k1:9092")
    assert "not authorized" in denied and "ACLs" in denied


# -- the command line -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["--config", "a.toml", "run"],
        ["run", "--config", "a.toml"],
        ["dead-letters", "--config", "a.toml", "list"],
        ["dead-letters", "list", "--config", "a.toml"],
    ],
)
def test_config_works_before_or_after_the_subcommand(argv: list[str]) -> None:
    assert _parser().parse_args(argv).config == "a.toml"


def test_without_config_the_file_is_none() -> None:
    assert _parser().parse_args(["run"]).config is None


def test_every_option_has_help_text() -> None:
    import argparse

    def walk(parser: argparse.ArgumentParser) -> list[str]:
        missing: list[str] = []
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, child in action.choices.items():
                    missing += [f"{name} {m}" for m in walk(child)]
            elif not action.help:
                missing.append("/".join(action.option_strings) or action.dest)
        return missing

    assert walk(_parser()) == []


# -- build info ----------------------------------------------------------------------------


def test_build_info_names_the_version_and_the_processor() -> None:
    metrics = Metrics()
    metrics.set_build_info(processor="fake", version="9.9.9")
    text = asyncio.run(metrics.render())
    assert 'payment_build_info{processor="fake",version="9.9.9"} 1' in text


# -- the README -------------------------------------------------------------------------------


def test_the_readme_documents_every_setting_and_command() -> None:
    from pathlib import Path

    readme = (Path(__file__).parents[2] / "README.md").read_text()
    undocumented = [
        name
        for name in sorted(Settings.__struct_fields__)
        if f"PAYMENT_{name.upper()}" not in readme
        # The topic names share one row: `PAYMENT_TOPIC_REQUEST`, `_INITIATED`, …
        and not (name.startswith("topic_") and f"`_{name[6:].upper()}`" in readme)
    ]
    assert undocumented == []
    import argparse

    commands = next(
        a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction)
    ).choices
    assert [c for c in commands if f"payment-service {c}" not in readme] == []


# -- instance metrics ------------------------------------------------------------------------


def test_process_pool_relay_and_failing_collector_series() -> None:
    from payment.adapters.observability.metrics import observe_pools
    from payment.adapters.observability.process_stats import process_stats

    metrics = Metrics()
    stats = process_stats()
    assert stats["cpu_s"] >= 0 and stats["rss_bytes"] > 0 and stats["open_fds"] >= 3

    async def collect_instance() -> None:
        metrics.observe("process.resident_memory", [(stats["rss_bytes"], {})])
        observe_pools(
            metrics,
            {"main": {"pool_size": 5, "pool_available": 2, "pool_max": 16, "requests_queued": 7}},
        )
        metrics.observe("payment.outbox.relay_leader", [(1, {})])

    async def collect_broken() -> None:
        raise ConnectionError("database down")

    metrics.add_collector(collect_instance)
    metrics.add_collector(collect_broken)
    text = asyncio.run(metrics.render())
    assert "# TYPE process_resident_memory_bytes gauge" in text
    assert "# TYPE process_cpu_seconds_total counter" in text
    assert 'payment_db_pool_connections{pool="main",state="used"} 3' in text
    assert 'payment_db_pool_connections{pool="main",state="idle"} 2' in text
    assert 'payment_db_pool_waits_total{pool="main"} 7' in text
    assert "payment_outbox_relay_leader 1" in text
    assert 'payment_metrics_collector_failures_total{collector="collect_broken"} 1' in text
    assert 'payment_metrics_collector_failures_total{collector="collect_instance"} 0' in text
