"""Migrations: upgrade -> downgrade -> upgrade on PostgreSQL and SQLite; schema == models."""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from db.migrate import current, downgrade, head, upgrade
from db.models import Base
from db.session import make_engine

TABLES = {"inspections", "audits", "reviews"}


def _schema(url: str) -> tuple[set[str], set[str]]:
    insp = sa.inspect(make_engine(url))
    return set(insp.get_table_names()), set(insp.get_view_names())


@pytest.mark.parametrize("fixture", ["sqlite_url", "pg_url"])
def test_upgrade_downgrade_upgrade(fixture: str, request: pytest.FixtureRequest) -> None:
    url = request.getfixturevalue(fixture)
    assert current(url) is None

    upgrade(url)
    tables, views = _schema(url)
    assert tables >= TABLES
    assert "review_queue" in views
    assert current(url) == head() == "0002"

    downgrade(url)
    tables, views = _schema(url)
    assert not TABLES & tables
    assert "review_queue" not in views
    assert current(url) is None

    upgrade(url)
    tables, views = _schema(url)
    assert tables >= TABLES
    assert "review_queue" in views
    assert current(url) == "0002"


def test_migrated_schema_matches_models(migrated_url: str) -> None:
    with make_engine(migrated_url).connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True})
        diff = compare_metadata(ctx, Base.metadata)
    assert diff == []


def test_constraints_have_conventional_names(migrated_url: str) -> None:
    insp = sa.inspect(make_engine(migrated_url))
    uniques = {u["name"] for u in insp.get_unique_constraints("audits")}
    assert "uq_audits_inspection_id_model_version_method" in uniques
    indexes = {i["name"] for i in insp.get_indexes("audits")}
    assert "ix_audits_suspected_false_negative_status" in indexes
    fks = {fk["name"] for fk in insp.get_foreign_keys("reviews")}
    assert "fk_reviews_inspection_id_inspections" in fks
    checks = {c["name"] for c in insp.get_check_constraints("inspections")}
    assert {"ck_inspections_prediction", "ck_inspections_score_range"} <= checks


def test_upgrade_creates_sqlite_folder(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from db.session import dispose_engines

    url = f"sqlite:///{(tmp_path / 'a' / 'b' / 'audit.sqlite3').as_posix()}"
    try:
        upgrade(url)
        assert (tmp_path / "a" / "b" / "audit.sqlite3").exists()
        assert current(url) == "0002"
    finally:
        dispose_engines(url)
