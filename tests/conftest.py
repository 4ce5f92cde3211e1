"""Shared pytest configuration. Fixtures live in per-area modules registered as plugins."""

pytest_plugins = [
    "tests.support.db",
    "tests.support.queue",
    "tests.support.models",
    "tests.support.rabbit",
]
