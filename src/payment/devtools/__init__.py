"""Tools around the service: dev mode, the demo, embedded processes, the AsyncAPI generator.

Nothing `payment-service run` imports depends on this package (an import-linter contract).
"""
