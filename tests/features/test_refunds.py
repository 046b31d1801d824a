"""Scenarios of features/refunds.feature."""

from pytest_bdd import scenarios

scenarios("refunds.feature")
