"""Kafka adapters: CloudEvents codec, consumer, outbox relay, dead letters."""
