"""Shared pytest configuration. Fixtures live in per-area modules registered as plugins."""

pytest_plugins = ["tests.fixtures_db", "tests.fixtures_queue", "tests.fixtures_models"]
