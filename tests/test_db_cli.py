"""CLI: `db upgrade|downgrade|current`, `review [--json]`, `review verdict` on SQLite."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from db.repository import review_queue
from db.session import session_scope
from inspection_audit.cli import main
from inspection_audit.settings import get_settings
from tests.test_db_repository import _populate


@pytest.fixture
def env_url(migrated_sqlite_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    monkeypatch.setenv("INSPECTION_AUDIT_DATABASE_URL", migrated_sqlite_url)
    get_settings.cache_clear()
    yield migrated_sqlite_url
    get_settings.cache_clear()


def invoke(*args: str) -> str:
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def test_review_json(env_url: str) -> None:
    _populate(env_url)
    rows = json.loads(invoke("review", "--json"))
    assert [r["inspection_id"] for r in rows] == ["B", "E", "G", "A"]
    assert rows[0]["decision_score"] == pytest.approx(0.9)
    assert rows[0]["captured_at"].startswith("2026-11-29T08:01:00")
    assert [r["inspection_id"] for r in json.loads(invoke("review", "--json", "--limit", "1"))] == [
        "B"
    ]


def test_review_table(env_url: str) -> None:
    _populate(env_url)
    out = invoke("review")
    assert "review queue: 4 of 4 waiting" in out
    for name in ("B", "E", "G", "A"):
        assert f" {name} " in out


def test_review_empty(env_url: str) -> None:
    assert json.loads(invoke("review", "--json")) == []
    assert "review queue: 0 of 0" in invoke("review")


def test_review_verdict(env_url: str) -> None:
    _populate(env_url)
    out = invoke("review", "verdict", "B", "confirmed", "--note", "crack", "--reviewer", "ann")
    assert "confirmed_defect" in out and "B" in out
    invoke("review", "verdict", "E", "cleared")
    assert [r["inspection_id"] for r in json.loads(invoke("review", "--json"))] == ["G", "A"]
    with session_scope(env_url) as s:
        from db.repository import latest_verdict

        b = latest_verdict(s, "B")
        assert b is not None
        assert (b["verdict"], b["reviewer"], b["note"]) == ("confirmed_defect", "ann", "crack")
        assert [r["inspection_id"] for r in review_queue(s)] == ["G", "A"]


def test_review_verdict_errors(env_url: str) -> None:
    _populate(env_url)
    result = CliRunner().invoke(main, ["review", "verdict", "nope", "cleared"])
    assert result.exit_code == 1
    assert "no inspection" in result.output
    result = CliRunner().invoke(main, ["review", "verdict", "B", "maybe"])
    assert result.exit_code == 2


def test_db_commands(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from db.session import dispose_engines

    home = tmp_path / "home" / "nested"
    monkeypatch.delenv("INSPECTION_AUDIT_DATABASE_URL", raising=False)
    monkeypatch.setenv("INSPECTION_AUDIT_HOME", str(home))
    get_settings.cache_clear()
    url = get_settings().resolved_database_url
    try:
        assert invoke("db", "current").strip() == "none"
        result = CliRunner().invoke(main, ["review", "--json"])
        assert result.exit_code == 1 and "db upgrade" in result.output
        assert "at revision 0005" in invoke("db", "upgrade")
        assert (home / "audit.sqlite3").exists()
        assert invoke("db", "current").strip() == "0005 (head)"
        assert "at revision base" in invoke("db", "downgrade")
        other = f"sqlite:///{(tmp_path / 'other.sqlite3').as_posix()}"
        assert "at revision 0005" in invoke("db", "upgrade", "--url", other)
        assert invoke("db", "current", "--url", other).strip() == "0005 (head)"
        assert invoke("db", "current").strip() == "none"
        dispose_engines(other)
    finally:
        dispose_engines(url)
        get_settings.cache_clear()
