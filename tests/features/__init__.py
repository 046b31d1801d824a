"""Gherkin scenarios (pytest-bdd): thin modules over features/*.feature."""
