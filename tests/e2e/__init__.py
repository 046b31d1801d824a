"""End-to-end tests: the composed `payment-service` process driven over Kafka."""
