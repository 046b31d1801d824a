"""Scenarios of features/requests.feature."""

from pytest_bdd import scenarios

scenarios("requests.feature")
