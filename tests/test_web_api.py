"""The review station's HTTP API and pages through FastAPI's test client, against the real
PostgreSQL and SQLite (``migrated_url``) and the real Redis (``queue_settings``).

Ingest by JSON and multipart; every validation error is the producer's own, as a 422;
idempotent resubmission; nothing answers without credentials but /healthz and the login form;
path traversal is a 404; CSRF is enforced; verdicts name the reviewer; the queue pages by
keyset and filters.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient

from db.models import Audit, Inspection, Review
from db.session import dispose_engines, session_scope
from inspection_audit.settings import Settings
from producer.api import prepare_message
from producer.schema import MessageError
from tests.support.queue import redis_queue_length, redis_queue_messages
from tests.support.web import (
    METHOD,
    OTHER_USER,
    TOKEN,
    USER,
    VERSION,
    bearer,
    csrf_of,
    fill,
    login,
    png_bytes,
    web_settings,
)


@dataclass
class Station:
    settings: Settings
    client: TestClient
    url: str
    tmp: Path


@pytest.fixture
def station(migrated_url: str, queue_settings: Settings, tmp_path: Path) -> Iterator[Station]:
    from inspection_audit.web import create_app

    s = web_settings(queue_settings, tmp_path, migrated_url)
    with TestClient(create_app(s)) as client:
        yield Station(s, client, migrated_url, tmp_path)
    dispose_engines(migrated_url)


def _message(iid: str = "L1-000001", **over: Any) -> dict[str, Any]:
    msg: dict[str, Any] = {
        "inspection_id": iid,
        "prediction": "ok",
        "score": 0.07,
        "line": "line-3",
        "station": "st-2",
        "captured_at": "2026-11-29T08:15:02+01:00",
    }
    msg.update(over)
    return {k: v for k, v in msg.items() if v is not None}


def _rows(url: str, table: Any) -> list[dict[str, Any]]:
    with session_scope(url) as s:
        return [dict(r) for r in s.execute(sa.select(table)).mappings()]


# --- ingest ------------------------------------------------------------------------------------
def test_ingest_json_path_and_inline(station: Station) -> None:
    root = station.settings.image_roots[0]
    (root / "a.png").write_bytes(png_bytes())
    r = station.client.post(
        "/api/v1/inspections", json=_message("L1-1", image_path="a.png"), headers=bearer()
    )
    assert r.status_code == 202, r.text
    assert r.json() == {
        "inspection_id": "L1-1",
        "status": "queued",
        "location": "/api/v1/inspections/L1-1",
    }
    data = png_bytes(seed=3)
    b64 = base64.b64encode(data).decode()
    r = station.client.post(
        "/api/v1/inspections", json=_message("L1-2", image_b64=b64), headers=bearer()
    )
    assert r.status_code == 202, r.text
    sent = [m["decoded_body"][0][0] for m in redis_queue_messages(station.settings)]
    assert [m["inspection_id"] for m in sent] == ["L1-1", "L1-2"]
    # exactly what the producer itself would have sent
    want = prepare_message(_message("L1-1", image_path="a.png"), station.settings)
    assert sent[0] == want.to_json_dict()
    assert sent[1]["image_b64"] == b64 and sent[1]["image_path"] is None


def test_ingest_multipart_inline_and_into_the_upload_folder(
    migrated_url: str, queue_settings: Settings, tmp_path: Path
) -> None:
    from inspection_audit.web import create_app

    s = web_settings(queue_settings, tmp_path, migrated_url)
    data = png_bytes(seed=5)
    fields = {k: str(v) for k, v in _message("MP-1").items()}
    with TestClient(create_app(s)) as client:
        r = client.post(
            "/api/v1/inspections",
            data=fields,
            files={"image": ("part.png", data, "image/png")},
            headers=bearer(),
        )
        assert r.status_code == 202, r.text
    (m,) = [m["decoded_body"][0][0] for m in redis_queue_messages(s)]
    assert base64.b64decode(m["image_b64"]) == data and m["score"] == 0.07
    # with an upload folder inside the image roots, the file is kept there and sent by path
    upload = s.image_roots[0] / "uploads"
    s2 = s.model_copy(update={"upload_dir": upload})
    with TestClient(create_app(s2)) as client:
        fields["inspection_id"] = "MP-2"
        r = client.post(
            "/api/v1/inspections",
            data=fields,
            files={"image": ("part.png", data, "image/png")},
            headers=bearer(),
        )
        assert r.status_code == 202, r.text
    m2 = [m["decoded_body"][0][0] for m in redis_queue_messages(s)][-1]
    assert m2["image_b64"] is None
    kept = list(upload.rglob("MP-2-*.png"))
    assert len(kept) == 1 and kept[0].read_bytes() == data
    assert m2["image_path"] == kept[0].relative_to(s.image_roots[0]).as_posix()
    # an upload folder outside the image roots is refused at start
    with pytest.raises(ValueError, match="inside an image root"):
        create_app(s.model_copy(update={"upload_dir": tmp_path / "elsewhere"}))
    dispose_engines(migrated_url)


BAD = [
    pytest.param(_message(score=1.5, image_path="a.png"), id="score-range"),
    pytest.param(_message(score=True, image_path="a.png"), id="score-bool"),
    pytest.param(_message(prediction="maybe", image_path="a.png"), id="prediction"),
    pytest.param(_message(inspection_id="has space", image_path="a.png"), id="id-pattern"),
    pytest.param(_message(captured_at="2026-11-29T08:15:02", image_path="a.png"), id="naive"),
    pytest.param(_message(line="   ", image_path="a.png"), id="blank-line"),
    pytest.param(_message(), id="no-image"),
    pytest.param(_message(image_path="a.png", image_b64="aGk="), id="two-images"),
    pytest.param(_message(image_path="../outside.png"), id="outside-roots"),
    pytest.param(_message(image_path="missing.png"), id="missing-file"),
    pytest.param(_message(image_b64="not base64!"), id="bad-base64"),
    pytest.param(_message(image_path="a.png", extra="x"), id="unknown-field"),
    pytest.param(_message(image_path="a.png", schema_version=2), id="schema-version"),
    pytest.param(_message(image_path="a.png", image_sha256="0" * 64), id="sha-mismatch"),
    pytest.param([1, 2], id="not-an-object"),
]


@pytest.mark.parametrize("payload", BAD)
def test_every_validation_error_is_the_producers_as_a_422(station: Station, payload: Any) -> None:
    (station.settings.image_roots[0] / "a.png").write_bytes(png_bytes())
    (station.tmp / "outside.png").write_bytes(png_bytes())
    with pytest.raises(MessageError) as err:
        prepare_message(payload, station.settings)
    r = station.client.post("/api/v1/inspections", json=payload, headers=bearer())
    assert r.status_code == 422, r.text
    assert [(e["field"], e["reason"]) for e in r.json()["detail"]] == err.value.errors
    assert redis_queue_length(station.settings) == 0


def test_inline_over_the_limit_multipart_and_body_limits(
    migrated_url: str, queue_settings: Settings, tmp_path: Path
) -> None:
    from inspection_audit.web import create_app
    from inspection_audit.web.app import ingest_body_limit

    s = web_settings(queue_settings, tmp_path, migrated_url, max_inline_bytes=2000)
    big = png_bytes((200, 200), seed=1)
    assert len(big) > 2000
    fields = {k: str(v) for k, v in _message("BIG-1").items()}
    with TestClient(create_app(s)) as client:
        r = client.post(
            "/api/v1/inspections",
            data=fields,
            files={"image": ("big.png", big, "image/png")},
            headers=bearer(),
        )
        assert r.status_code == 422
        (err,) = r.json()["detail"]
        assert err["field"] == "image" and "over the limit of 2000" in err["reason"]
        # a body over the ingest limit is refused before it is read
        huge = b"x" * (ingest_body_limit(s) + 1)
        r = client.post(
            "/api/v1/inspections",
            content=huge,
            headers={**bearer(), "content-type": "application/json"},
        )
        assert r.status_code == 413
        # a form body over the form limit too
        r = client.post(
            "/login",
            content=b"a=" + b"x" * 70_000,
            headers={"content-type": "application/x-www-form-urlencoded"},
        )
        assert r.status_code == 413
        r = client.post(
            "/api/v1/inspections",
            content=b"<xml/>",
            headers={**bearer(), "content-type": "text/xml"},
        )
        assert r.status_code == 415
        r = client.post(
            "/api/v1/inspections",
            content=b"{not json",
            headers={**bearer(), "content-type": "application/json"},
        )
        assert r.status_code == 422 and "not valid JSON" in r.json()["detail"][0]["reason"]
    assert redis_queue_length(s) == 0
    dispose_engines(migrated_url)


def test_resubmission_is_idempotent(station: Station) -> None:
    root = station.settings.image_roots[0]
    (root / "a.png").write_bytes(png_bytes())
    fill(station.settings, flagged=1, unflagged=0, errors=0, maps=False)
    # an id whose row exists: accepted, not sent again
    r = station.client.post(
        "/api/v1/inspections",
        json=_message("INS-flagged-0000", image_path="a.png"),
        headers=bearer(),
    )
    assert r.status_code == 202 and r.json()["status"] == "duplicate"
    assert redis_queue_length(station.settings) == 0
    assert len(_rows(station.url, Inspection.__table__)) == 1
    assert len(_rows(station.url, Audit.__table__)) == 1


def test_get_inspection(station: Station) -> None:
    fill(station.settings, flagged=1, unflagged=0, errors=1, maps=False)
    r = station.client.get("/api/v1/inspections/INS-flagged-0000", headers=bearer())
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["status"] == "audited" and body["line"] == "line-1"
    (a,) = body["audits"]
    assert a["decision_score"] == pytest.approx(0.9) and a["tau"] == pytest.approx(0.1)
    assert a["suspected_false_negative"] is True and a["scores"][METHOD] == pytest.approx(0.9)
    assert (
        station.client.get("/api/v1/inspections/INS-error-0000", headers=bearer()).json()["status"]
        == "error"
    )
    r = station.client.get("/api/v1/inspections/NOPE-1", headers=bearer())
    assert r.status_code == 404 and r.json()["status"] == "unknown"
    assert station.client.get("/api/v1/inspections/bad%20id", headers=bearer()).status_code == 422


# --- credentials -----------------------------------------------------------------------------
def _flat(routes: list[Any]) -> list[Any]:
    out = []
    for route in routes:
        inner = getattr(route, "original_router", None)  # FastAPI's included routers
        out += _flat(list(inner.routes)) if inner is not None else [route]
    return out


def _routes(app: Any) -> list[tuple[str, str]]:
    out = []
    for route in _flat(list(app.routes)):
        path = getattr(route, "path", "")
        for method in sorted(getattr(route, "methods", None) or ()):
            if method == "HEAD":
                continue
            concrete = re.sub(r"\{[^}]+\}", "1", path.replace("{path:path}", "x.png"))
            out.append((method, concrete))
    return out


def test_nothing_answers_without_credentials(station: Station) -> None:
    app = station.client.app
    checked = 0
    for method, path in _routes(app):
        if path in ("/healthz", "/login"):
            continue
        for headers in ({}, {"Authorization": "Bearer wrong-token"}, {"Authorization": "Basic x"}):
            r = station.client.request(method, path, headers=headers, follow_redirects=False)
            assert r.status_code == 401, (method, path, headers, r.status_code)
            checked += 1
        r = station.client.request(
            method, path, headers={"accept": "text/html"}, follow_redirects=False
        )
        assert r.status_code in (401, 303), (method, path)
        if r.status_code == 303:
            assert r.headers["location"].startswith("/login?next=")
    assert checked >= 3 * 12
    assert station.client.get("/healthz").status_code == 200
    assert station.client.get("/login").status_code == 200
    # a wrong password logs nobody in
    token = csrf_of(station.client.get("/login").text)
    r = station.client.post(
        "/login", data={"username": USER, "password": "nope", "csrf_token": token}
    )
    assert r.status_code == 401
    assert station.client.get("/queue", follow_redirects=False).status_code == 401


def test_path_traversal_is_a_404(station: Station) -> None:
    fill(station.settings, flagged=1, unflagged=0, errors=0)
    results = station.settings.resolved_results_dir
    secret = station.tmp / "secret.txt"
    secret.write_text("no")
    (results / "link.png").symlink_to(secret)
    with session_scope(station.url) as s:
        s.execute(sa.update(Audit).values(overlay_path=str(secret)))
        s.execute(sa.update(Inspection).values(image_ref="../secret.txt"))
        aid = s.execute(sa.select(Audit.id)).scalar_one()
    h = bearer()
    c = station.client
    for path in (
        "/results/../secret.txt",
        "/results/%2e%2e/secret.txt",
        "/results/..%2fsecret.txt",
        "/results/%2e%2e%2f%2e%2e%2fetc%2fpasswd",
        "/results//etc/passwd",
        "/results/link.png",
        f"/media/audit/{aid}/composite",
        f"/media/audit/{aid}/..%2f..%2fsecret",
        "/media/inspection/INS-flagged-0000/original",
        "/static/..%2fapp.py",
        "/static/auth.py",
    ):
        r = c.get(path, headers=h)
        assert r.status_code == 404, (path, r.status_code)
    # the maps themselves are served
    gradcam = next((results / "overlays").rglob("gradcam_defect.png"))
    rel = gradcam.relative_to(results).as_posix()
    r = c.get(f"/results/{rel}", headers=h)
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert c.get(f"/media/audit/{aid}/gradcam_defect", headers=h).status_code == 200


def test_csrf_is_enforced(station: Station) -> None:
    fill(station.settings, flagged=2, unflagged=0, errors=0, maps=False)
    c = station.client
    # the login form itself needs its token
    r = c.post("/login", data={"username": USER, "password": "x"})
    assert r.status_code == 403
    token = login(c)
    target = "/inspections/INS-flagged-0000/verdict"
    for data in ({"verdict": "confirmed"}, {"verdict": "confirmed", "csrf_token": "forged"}):
        assert c.post(target, data=data, follow_redirects=False).status_code == 403
    assert _rows(station.url, Review.__table__) == []
    r = c.post("/api/v1/inspections", json=_message("X-1", image_path="a.png"))  # cookie, no header
    assert r.status_code == 403
    r = c.post(
        target,
        data={"verdict": "confirmed", "csrf_token": token, "note": "crack at the edge"},
        follow_redirects=False,
    )
    assert r.status_code == 303
    (review,) = _rows(station.url, Review.__table__)
    assert review["reviewer"] == USER and review["verdict"] == "confirmed_defect"
    assert review["note"] == "crack at the edge"
    # another reviewer's session has another token
    c2 = TestClient(c.app)
    token2 = login(c2, OTHER_USER, "other")
    assert token2 != token
    assert (
        c2.post(
            "/inspections/INS-flagged-0001/verdict",
            data={"verdict": "cleared", "csrf_token": token},
            follow_redirects=False,
        ).status_code
        == 403
    )
    r = c2.post(
        "/inspections/INS-flagged-0001/verdict",
        data={"verdict": "cleared", "csrf_token": token2},
        follow_redirects=False,
    )
    assert r.status_code == 303
    assert {r["reviewer"] for r in _rows(station.url, Review.__table__)} == {USER, OTHER_USER}
    # logging out ends the session
    assert c.post("/logout", data={"csrf_token": token}, follow_redirects=False).status_code == 303
    assert c.get("/queue", follow_redirects=False).status_code == 401


# --- pages --------------------------------------------------------------------------------------
def test_queue_pages_filters_and_next_item(station: Station) -> None:
    filled = fill(station.settings, flagged=7, unflagged=2, errors=1)
    c = station.client
    token = login(c)
    seen: list[str] = []
    url: str | None = "/queue?size=3"
    pages = 0
    while url:
        html = c.get(url).text
        seen += re.findall(r'data-inspection-id="([^"]+)"', html)
        assert "7 suspected false negatives waiting" in html
        m = re.search(r'href="([^"]+)" id="next-page"', html)
        url = m.group(1).replace("&amp;", "&") if m else None
        pages += 1
    assert seen == filled.flagged and pages == 3  # most suspicious first, each once
    # back one page from the last
    last = c.get(
        "/queue?size=3&after=" + re.search(r"after=([^&\"]+)", c.get("/queue?size=3").text).group(1)
    ).text
    prev = re.search(r'href="([^"]+)" id="prev-page"', last)
    assert prev is not None
    assert (
        re.findall(r'data-inspection-id="([^"]+)"', c.get(prev.group(1).replace("&amp;", "&")).text)
        == filled.flagged[:3]
    )
    # a line filter narrows the queue
    html = c.get("/queue?line=line-2").text
    ids = re.findall(r'data-inspection-id="([^"]+)"', html)
    assert ids == [i for n, i in enumerate(filled.flagged) if n % 2 == 1]
    assert f"{len(ids)} suspected false negatives waiting" in html
    # the inspection page shows every map and every score with its τ
    page = c.get("/inspections/INS-flagged-0000").text
    for name in ("gradcam_defect", "gradcam_ok", "agnostic"):
        assert f'data-map="{name}"' in page
    assert "IoU gap r_adv after one adversarial step" in page  # the registry's label
    # a verdict on the first opens the next in queue order
    r = c.post(
        "/inspections/INS-flagged-0000/verdict",
        data={
            "verdict": "cleared",
            "csrf_token": token,
            "return": "next",
            "cursor": re.search(r'name="cursor" value="([^"]+)"', page).group(1),
        },
        follow_redirects=False,
    )
    assert r.status_code == 303 and r.headers["location"].startswith(
        "/inspections/INS-flagged-0001?"
    )
    html = c.get("/queue").text
    assert "INS-flagged-0000" not in html and "6 suspected false negatives" in html


def test_overview_counts_equal_the_rows(station: Station) -> None:
    filled = fill(station.settings, flagged=4, unflagged=3, errors=2, maps=False)
    c = station.client
    token = login(c)
    for iid, v in (
        (filled.flagged[0], "confirmed"),
        (filled.flagged[1], "cleared"),
        (filled.flagged[2], "confirmed"),
    ):
        c.post(f"/inspections/{iid}/verdict", data={"verdict": v, "csrf_token": token})
    html = c.get("/overview").text
    assert re.search(r'id="total-audited">9<', html)
    assert re.search(r'id="total-flagged">4<', html)
    assert re.search(r'id="total-errors">2<', html)
    assert "66.7 %" in html  # 2 of 3 reviewed flags confirmed
    assert "cannot decode image 0" in html and "cannot decode image 1" in html
    assert "<svg" in html
    from inspection_audit.web.queries import overview

    with session_scope(station.url) as s:
        data = overview(s)
    per_line = {r["key"]: r for r in data["per_line"]}
    assert sum(r["audited"] for r in per_line.values()) == 9
    assert per_line["line-1"]["confirmed"] + per_line["line-2"]["confirmed"] == 2
    assert data["per_version"][0]["key"] == VERSION


def test_token_is_not_a_password(station: Station) -> None:
    token = csrf_of(station.client.get("/login").text)
    r = station.client.post(
        "/login", data={"username": "line", "password": TOKEN, "csrf_token": token}
    )
    assert r.status_code == 401


def test_api_tokens_cannot_decide_or_export(
    migrated_url: str, queue_settings: Settings, tmp_path: Path
) -> None:
    """A line gateway's token may ingest and read; a verdict names a person, so it and the
    export of reviewed images need a logged-in reviewer (403 for a token, nothing recorded)."""
    import sqlalchemy as sa

    from db.models import Review
    from inspection_audit.web import create_app

    s = web_settings(queue_settings, tmp_path, migrated_url)
    fill(s, flagged=1, unflagged=0, errors=0, maps=False)
    with TestClient(create_app(s)) as client:
        r = client.post(
            "/inspections/INS-flagged-0000/verdict", data={"verdict": "cleared"}, headers=bearer()
        )
        assert r.status_code == 403
        assert client.get("/export.zip", headers=bearer()).status_code == 403
        assert (
            client.get("/api/v1/inspections/INS-flagged-0000", headers=bearer()).status_code == 200
        )
    with session_scope(migrated_url) as session:
        assert session.execute(sa.select(sa.func.count()).select_from(Review)).scalar_one() == 0
