"""Migrations: upgrade -> downgrade -> upgrade on PostgreSQL and SQLite; schema == models."""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from db.migrate import current, downgrade, head, upgrade
from db.models import Base
from db.session import make_engine

TABLES = {"inspections", "audits", "reviews", "delivery_attempts", "dead_letters", "outbox"}


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
    assert current(url) == head() == "0005"

    downgrade(url)
    tables, views = _schema(url)
    assert not TABLES & tables
    assert "review_queue" not in views
    assert current(url) is None

    upgrade(url)
    tables, views = _schema(url)
    assert tables >= TABLES
    assert "review_queue" in views
    assert current(url) == head()


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
        assert current(url) == head()
    finally:
        dispose_engines(url)


OLD_SCORES = {
    "p_defect": 0.1,
    "energy": -1.5,
    "iou_defect": 0.6,
    "iou_ok": 0.1,
    "iou_gap": 0.5,
    "p_defect_adv": 0.4,
    "iou_defect_adv": 0.7,
    "iou_ok_adv": 0.05,
    "iou_gap_adv": 0.65,
    "fusion_score": 0.3,
}


@pytest.mark.parametrize("fixture", ["sqlite_url", "pg_url"])
def test_0003_moves_scores_into_json_and_back_without_loss(
    fixture: str, request: pytest.FixtureRequest
) -> None:
    """Rows written under 0002 (one column per score) keep every value through 0003 (JSON
    ``scores``/``details``, read by name through ``audit_scores``) and back down to 0002."""
    url = request.getfixturevalue(fixture)
    upgrade(url, "0002")
    engine = make_engine(url)
    cols = ", ".join(OLD_SCORES)
    marks = ", ".join(f":{c}" for c in OLD_SCORES)
    with engine.begin() as c:
        c.execute(
            sa.text(
                "INSERT INTO inspections (inspection_id, image_ref, captured_at, prediction, score) "
                "VALUES ('A', 'a.png', :t, 'ok', 0.1), ('B', 'b.png', :t, 'ok', 0.2)"
            ),
            {"t": "2026-01-01 00:00:00+00:00"},
        )
        c.execute(
            sa.text(
                f"INSERT INTO audits (inspection_id, model_version, method, status, {cols}, "
                "flipped, decision_score, tau, suspected_false_negative) VALUES "
                f"('A', 'v', 'iou_gap_adv', 'done', {marks}, :flipped, 0.65, 0.2, :flag)"
            ),
            {**OLD_SCORES, "flipped": True, "flag": True},
        )
        c.execute(
            sa.text(
                "INSERT INTO audits (inspection_id, model_version, method, status, error) "
                "VALUES ('B', 'v', 'iou_gap_adv', 'error', 'bad image')"
            )
        )

    upgrade(url, "0003")
    assert current(url) == "0003"
    with engine.connect() as c:
        got = {
            r.method: r.value
            for r in c.execute(sa.text("SELECT method, value FROM audit_scores")).all()
        }
        queue = c.execute(
            sa.text("SELECT inspection_id, iou_gap, iou_gap_adv, p_defect_adv FROM review_queue")
        ).all()
        b_scores = c.execute(sa.text("SELECT scores FROM audits WHERE inspection_id = 'B'")).one()
    assert got == pytest.approx(
        {
            "msp": 0.1,
            "energy": -1.5,
            "iou_gap": 0.5,
            "iou_gap_adv": 0.65,
            "iou_defect": 0.6,
            "iou_defect_adv": 0.7,
            "fusion": 0.3,
        }
    )
    assert [(q[0], q[1], q[2], q[3]) for q in queue] == [("A", 0.5, 0.65, 0.4)]
    assert b_scores[0] is None  # an error row has no scores

    downgrade(url, "0002")
    assert current(url) == "0002"
    with engine.connect() as c:
        row = c.execute(
            sa.text(f"SELECT {cols}, flipped FROM audits WHERE inspection_id = 'A'")
        ).one()
        err = c.execute(
            sa.text(f"SELECT status, error, {cols} FROM audits WHERE inspection_id = 'B'")
        ).one()
    assert dict(zip(OLD_SCORES, row[:-1], strict=True)) == pytest.approx(OLD_SCORES)
    assert bool(row[-1]) is True
    assert err[0] == "error" and err[1] == "bad image" and all(v is None for v in err[2:])


@pytest.mark.parametrize("fixture", ["sqlite_url", "pg_url"])
def test_0004_keeps_the_cap_decision_of_old_attempt_counts(
    fixture: str, request: pytest.FixtureRequest
) -> None:
    """Counts written under 0003 (every delivery counted) become ``lost`` = attempts - 1 and,
    where no audit row exists yet, an open latest attempt: the next start charges it, so the
    next decision is the one the old counter would have made (lost = attempts). Keys with a
    row have nothing open. Downgrading drops the two columns and keeps ``attempts``."""
    from db.deliveries import attempt_state, start_attempt
    from db.session import session_scope

    url = request.getfixturevalue(fixture)
    upgrade(url, "0003")
    engine = make_engine(url)
    with engine.begin() as c:
        c.execute(
            sa.text(
                "INSERT INTO inspections (inspection_id, image_ref, captured_at, prediction, score) "
                "VALUES ('done-1', 'a.png', :t, 'ok', 0.1)"
            ),
            {"t": "2026-01-01 00:00:00+00:00"},
        )
        c.execute(
            sa.text(
                "INSERT INTO audits (inspection_id, model_version, method, status) "
                "VALUES ('done-1', 'v', 'm', 'done')"
            )
        )
        c.execute(
            sa.text(
                "INSERT INTO delivery_attempts (inspection_id, model_version, method, attempts) "
                "VALUES ('done-1', 'v', 'm', 2), ('open-3', 'v', 'm', 3), ('open-1', 'v', 'm', 1)"
            )
        )
    upgrade(url)
    with session_scope(url) as s:
        assert attempt_state(s, ("done-1", "v", "m")).open_attempt is None
        assert attempt_state(s, ("done-1", "v", "m")).lost == 1
        three = attempt_state(s, ("open-3", "v", "m"))
        assert (three.attempts, three.open_attempt, three.lost) == (3, 3, 2)
        one = attempt_state(s, ("open-1", "v", "m"))
        assert (one.attempts, one.open_attempt, one.lost) == (1, 1, 0)
    with session_scope(url) as s:
        # the old counter would now say: 4 deliveries, lost = 3
        nxt = start_attempt(s, ("open-3", "v", "m"))
        assert (nxt.number, nxt.lost) == (4, 3)
    downgrade(url, "0003")
    with engine.connect() as c:
        cols = {col["name"] for col in sa.inspect(c).get_columns("delivery_attempts")}
        n = c.execute(
            sa.text("SELECT attempts FROM delivery_attempts WHERE inspection_id = 'open-3'")
        ).scalar_one()
    assert "lost" not in cols and "open_attempt" not in cols and n == 4
