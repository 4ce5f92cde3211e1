"""Schemathesis against the served OpenAPI spec, a bounded number of examples per operation:
no request, valid or not, makes the review station answer 500 (SQLite and PostgreSQL)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from db.session import dispose_engines
from inspection_audit.settings import Settings
from tests.support.web import bearer, fill, png_bytes, web_settings

MAX_EXAMPLES = 25


def _schema(url: str, base: Settings, tmp_path: Path) -> Any:
    from inspection_audit.web import create_app

    s = web_settings(base, tmp_path, url)
    (s.image_roots[0] / "a.png").write_bytes(png_bytes())
    fill(s, flagged=2, unflagged=1, errors=1, maps=False)
    app = create_app(s)
    return schemathesis.openapi.from_asgi("/openapi.json", app, headers=bearer())


@pytest.mark.parametrize("dialect", ["sqlite", "postgresql"])
def test_no_500s(
    dialect: str, request: pytest.FixtureRequest, queue_settings: Settings, tmp_path: Path
) -> None:
    url = request.getfixturevalue(
        "migrated_sqlite_url" if dialect == "sqlite" else "migrated_pg_url"
    )
    schema = _schema(url, queue_settings, tmp_path)
    operations = [op.ok() for op in schema.get_all_operations()]
    labels = sorted(op.label for op in operations)
    assert (
        "POST /api/v1/inspections" in labels and "GET /api/v1/inspections/{inspection_id}" in labels
    )
    statuses: list[int] = []
    media: set[str] = set()
    runs = [
        (op, mode, ctype)
        for op in operations
        for mode in GenerationMode
        for ctype in (op.get_request_payload_content_types() or [None])
    ]
    for op, mode, ctype in runs:

        @settings(
            max_examples=MAX_EXAMPLES,
            deadline=None,
            database=None,
            derandomize=True,
            suppress_health_check=list(HealthCheck),
        )
        @given(case=op.as_strategy(mode, media_type=ctype))
        def run(case: Any) -> None:
            response = case.call(headers=bearer())
            statuses.append(response.status_code)
            if case.media_type:
                media.add(case.media_type)
            assert response.status_code < 500, (case.method, case.path, response.text[:500])

        try:
            run()
        except Unsatisfiable:
            # nothing to make invalid (an operation without parameters or body)
            assert mode is GenerationMode.NEGATIVE, op.label
    assert statuses and all(s < 500 for s in statuses)
    assert 422 in statuses  # invalid messages reached the producer's validation
    assert media == {"application/json", "multipart/form-data"}
    dispose_engines(url)
