"""Alembic migrations of inspection-audit (configured from code by ``db.migrate``)."""
