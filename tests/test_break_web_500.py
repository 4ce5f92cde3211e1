"""Break: the pages and media routes (outside the OpenAPI spec, so outside the schemathesis
run) answer 500 to an audit id over 64 bits or a NUL byte in an id or a filter (PostgreSQL
refuses NUL in text; both dialects refuse integers over 64 bits)."""

from __future__ import annotations

from pathlib import Path

import pytest

from db.session import dispose_engines
from inspection_audit.settings import Settings
from tests.support.web import bearer, fill, web_settings

PATHS = [
    "/queue?after=0.5_99999999999999999999999",
    "/queue?before=0.5_-99999999999999999999999",
    "/media/audit/99999999999999999999999/composite",
    "/queue?line=%00",
    "/queue?station=a%00b",
    "/queue?model_version=%00",
    "/queue?method=%00",
    "/inspections/a%00b",
    "/media/inspection/a%00b/original",
]


@pytest.mark.parametrize("dialect", ["sqlite", "postgresql"])
def test_no_500_on_odd_ids_and_filters(
    dialect: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    from fastapi.testclient import TestClient

    from inspection_audit.web import create_app

    url = request.getfixturevalue(
        "migrated_sqlite_url" if dialect == "sqlite" else "migrated_pg_url"
    )
    s = web_settings(Settings(home=tmp_path), tmp_path, url)
    filled = fill(s, flagged=2, unflagged=1, errors=1, maps=False)
    client = TestClient(create_app(s), raise_server_exceptions=False)
    found = {p: client.get(p, headers=bearer()).status_code for p in PATHS}
    r = client.post("/inspections/a%00b/verdict", data={"verdict": "cleared"}, headers=bearer())
    found["POST /inspections/a%00b/verdict"] = r.status_code
    iid = filled.flagged[0]
    r = client.post(
        f"/inspections/{iid}/verdict",
        data={"verdict": "cleared", "note": "a\x00b", "cursor": "0.5_99999999999999999999999"},
        headers=bearer(),
    )
    found["POST verdict with a NUL in its note"] = r.status_code
    dispose_engines(url)
    assert not [p for p, code in found.items() if code >= 500], found
