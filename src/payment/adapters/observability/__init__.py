"""Observability adapters: tracing, metrics, logs, log budget, instrumented decorators, HTTP."""
