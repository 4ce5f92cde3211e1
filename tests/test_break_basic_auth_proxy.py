"""Break: behind a reverse proxy that asks for HTTP Basic auth, every browser request carries
``Authorization: Basic …``; the station takes any Authorization header as an API credential
and refuses the reviewer's valid session (401 on every page)."""

from __future__ import annotations

from pathlib import Path

from fastapi.testclient import TestClient

from db.session import dispose_engines
from inspection_audit.settings import Settings
from tests.support.web import login, web_settings


def test_a_session_works_behind_a_basic_auth_proxy(
    migrated_sqlite_url: str, tmp_path: Path
) -> None:
    from inspection_audit.web import create_app

    s = web_settings(Settings(home=tmp_path), tmp_path, migrated_sqlite_url)
    with TestClient(create_app(s)) as client:
        login(client)
        r = client.get(
            "/queue",
            headers={"Authorization": "Basic cHJveHk6cGFzcw==", "Accept": "text/html"},
            follow_redirects=False,
        )
        # a wrong bearer token is still refused, session or not
        bad = client.get("/queue", headers={"Authorization": "Bearer nope"})
    dispose_engines(migrated_sqlite_url)
    assert r.status_code == 200, r.status_code
    assert bad.status_code == 401
