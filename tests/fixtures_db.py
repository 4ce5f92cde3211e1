"""Fixtures: db."""
