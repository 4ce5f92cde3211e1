"""Fixtures: queue."""
