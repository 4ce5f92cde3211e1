"""Break: an empty ``<home>/web-secret`` (a crash or full disk between its creation and its
write, or two servers racing to create it) becomes the empty signing key, and anyone can forge
a reviewer's session cookie."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import itsdangerous

from inspection_audit.settings import Settings


def test_an_empty_secret_file_is_never_used_as_the_key(tmp_path: Path) -> None:
    from inspection_audit.web.auth import session_secret

    home = tmp_path / "home"
    home.mkdir()
    (home / "web-secret").write_text("\n")
    try:
        secret = session_secret(Settings(home=home))
    except ValueError:
        return  # refused: fine
    assert len(secret) >= 32


def test_a_forged_cookie_is_refused_with_an_empty_secret_file(
    tmp_path: Path, migrated_sqlite_url: str
) -> None:
    from fastapi.testclient import TestClient

    from db.session import dispose_engines
    from inspection_audit.web.app import create_app
    from inspection_audit.web.auth import hash_password

    home = tmp_path / "home"
    home.mkdir()
    (home / "web-secret").touch()
    s = Settings(
        home=home,
        database_url=migrated_sqlite_url,
        web_users=[f"ann:{hash_password('pw', n=2**10)}"],
    )
    try:
        app = create_app(s)
    except ValueError:
        return  # refused to start: fine
    forged = itsdangerous.TimestampSigner("").sign(
        base64.b64encode(json.dumps({"user": "ann"}).encode())
    )
    with TestClient(app) as client:
        r = client.get("/api/v1/inspections/X-1", cookies={"ia_session": forged.decode()})
    dispose_engines(migrated_sqlite_url)
    assert r.status_code == 401, r.text
