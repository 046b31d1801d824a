"""What `payment-service run` is made of besides the adapters: the checks before start-up,
the readiness answer, the metrics collectors and the running components (relay, consumer,
background workers) as resources the container starts and stops (bootstrap.py)."""
