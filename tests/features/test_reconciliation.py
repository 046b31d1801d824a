"""Scenarios of features/reconciliation.feature."""

from pytest_bdd import scenarios

scenarios("reconciliation.feature")
