"""Adapters: the only code that touches PostgreSQL, Kafka, HTTP and gateways."""
