"""Test helpers: where the tests find a Kafka broker and a PostgreSQL database."""
