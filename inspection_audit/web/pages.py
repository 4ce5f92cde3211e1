"""The reviewer's pages: log in, the queue, one inspection, the overview, the export download."""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import APIRouter, Form, HTTPException, Query, Request
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response
from starlette.background import BackgroundTask

from inspection_audit.web.auth import csrf_ok, csrf_token
from inspection_audit.web.deps import CsrfDep, ReviewerDep, State, StateDep, WhoDep

router = APIRouter(include_in_schema=False)

STATIC = Path(__file__).parent / "static"
#: The static files, by name (nothing else is served from the folder).
STATIC_FILES = {"app.css": "text/css", "review.js": "text/javascript"}
PAGE_SIZE = 50
CHOICES_TTL_S = 60.0
#: Map order on the inspection page.
MAP_ORDER = ("gradcam_defect", "gradcam_ok", "agnostic")


def render(request: Request, st: State, name: str, status: int = 200, **ctx: Any) -> HTMLResponse:
    """A template with the common context (user, CSRF token, the page's name)."""
    ctx.setdefault("user", request.session.get("user"))
    ctx["csrf"] = csrf_token(request.session)
    ctx["page"] = name.removesuffix(".html")
    return st.templates.TemplateResponse(request, name, ctx, status_code=status)


def _safe_next(target: str | None) -> str:
    if target and target.startswith("/") and not target.startswith("//") and "\\" not in target:
        return target
    return "/queue"


# --- log in / out ---------------------------------------------------------------------------
@router.get("/login")
def login_page(request: Request, st: StateDep, next: str = "/queue") -> Response:
    return render(request, st, "login.html", next=_safe_next(next), error=None)


@router.post("/login")
def login(
    request: Request,
    st: StateDep,
    username: Annotated[str, Form()] = "",
    password: Annotated[str, Form()] = "",
    csrf_token_field: Annotated[str, Form(alias="csrf_token")] = "",
    next: Annotated[str, Form()] = "/queue",
) -> Response:
    if not csrf_ok(request.session, csrf_token_field):
        return render(
            request,
            st,
            "login.html",
            403,
            next=_safe_next(next),
            error="The form expired; try again.",
        )
    if not st.accounts.check_password(username, password):
        return render(
            request, st, "login.html", 401, next=_safe_next(next), error="Wrong name or password."
        )
    request.session.clear()
    request.session["user"] = username
    csrf_token(request.session)
    return RedirectResponse(_safe_next(next), status_code=303)


@router.post("/logout")
def logout(request: Request, who: CsrfDep) -> Response:
    request.session.clear()
    return RedirectResponse("/login", status_code=303)


# --- static files (behind the login like everything else) ----------------------------------
@router.get("/static/{name}")
def static(name: str, who: WhoDep) -> Response:
    if name not in STATIC_FILES:
        raise HTTPException(404, "not found")
    return FileResponse(
        STATIC / name,
        media_type=STATIC_FILES[name],
        headers={"Cache-Control": "private, max-age=300"},
    )


# --- the queue ----------------------------------------------------------------------------------
def _choices(st: State, session: Any) -> dict[str, list[str]]:
    from inspection_audit.web.queries import filter_choices

    cached = st.choices_cache.get("choices")
    if cached is not None and time.monotonic() - cached[0] < CHOICES_TTL_S:
        return dict(cached[1])
    found = filter_choices(session)
    st.choices_cache["choices"] = (time.monotonic(), found)
    return found


def _filter(request: Request) -> Any:
    from inspection_audit.web.queries import BadFilter, QueueFilter

    try:
        return QueueFilter.from_params(request.query_params), None
    except BadFilter as exc:
        return QueueFilter(), str(exc)


@router.get("/")
def home(who: WhoDep) -> Response:
    return RedirectResponse("/queue", status_code=303)


@router.get("/queue")
def queue(
    request: Request,
    who: WhoDep,
    st: StateDep,
    after: str | None = None,
    before: str | None = None,
    size: Annotated[int, Query(ge=1, le=200)] = PAGE_SIZE,
) -> Response:
    from db.session import session_scope
    from inspection_audit.web.queries import Cursor, queue_page

    f, problem = _filter(request)
    with session_scope(st.url) as session:
        page = queue_page(
            session, f, after=Cursor.decode(after), before=Cursor.decode(before), limit=size
        )
        choices = _choices(st, session)
    params = f.params()
    paging = {**params, **({"size": str(size)} if size != PAGE_SIZE else {})}
    return render(
        request,
        st,
        "queue.html",
        rows=page.rows,
        total=page.total,
        filters=params,
        choices=choices,
        problem=problem,
        size=size,
        next_url=f"/queue?{urlencode({**paging, 'after': page.next.encode()})}"
        if page.next
        else None,
        prev_url=f"/queue?{urlencode({**paging, 'before': page.prev.encode()})}"
        if page.prev
        else None,
        first_url=f"/queue?{urlencode(paging)}",
        filter_qs=urlencode(params),
        here=str(request.url.path) + (f"?{request.url.query}" if request.url.query else ""),
    )


# --- one inspection ------------------------------------------------------------------------
def _score_rows(audit: dict[str, Any]) -> list[dict[str, Any]]:
    from worker.engine.methods import REGISTRY

    scores = audit.get("scores") or {}
    taus = dict((audit.get("params") or {}).get("taus") or {})
    if audit.get("tau") is not None:
        taus.setdefault(audit["method"], audit["tau"])
    rows = []
    names = [m.name for m in REGISTRY] + sorted(k for k in scores if k not in REGISTRY)
    for name in names:
        if name not in scores and name != audit["method"]:
            continue
        value = scores.get(name)
        tau = taus.get(name)
        method = REGISTRY.get(name) if name in REGISTRY else None
        rows.append(
            {
                "name": name,
                "value": value,
                "tau": tau,
                "over": value is not None and tau is not None and value >= tau,
                "label": method.label if method else "",
                "family": method.family if method else "",
                "decision": name == audit["method"],
            }
        )
    return rows


def _maps(audit: dict[str, Any]) -> list[dict[str, str]]:
    from worker.model.naming import map_title

    maps = (audit.get("details") or {}).get("maps") or {}
    names = [n for n in MAP_ORDER if n in maps]
    names += sorted(n for n in maps if n not in MAP_ORDER and n != "image")
    return [
        {"name": n, "title": map_title(n), "url": f"/media/audit/{audit['id']}/{n}"} for n in names
    ]


def _focus(view: Any, audit_id: int | None) -> dict[str, Any] | None:
    """The audit the page is about: the one asked for, else a flagged one, else the newest."""
    if audit_id is not None:
        for a in view.audits:
            if a["id"] == audit_id:
                return dict(a)
    flagged = [a for a in view.audits if a["suspected_false_negative"] and a["status"] == "done"]
    pool = flagged or view.audits
    return dict(pool[-1]) if pool else None


@router.get("/inspections/{inspection_id}")
def inspection_page(
    request: Request,
    inspection_id: str,
    who: WhoDep,
    st: StateDep,
    audit_id: int | None = None,
) -> Response:
    from db.session import session_scope
    from inspection_audit.web.queries import cursor_of, inspection_view, neighbours, stored_id

    if not stored_id(inspection_id):
        raise HTTPException(404, f"no inspection {inspection_id!r}")
    f, problem = _filter(request)
    with session_scope(st.url) as session:
        view = inspection_view(session, inspection_id)
        if view is None:
            raise HTTPException(404, f"no inspection {inspection_id!r}")
        focus = _focus(view, audit_id)
        prev_row = next_row = None
        if focus is not None:
            prev_row, next_row = neighbours(
                session,
                f,
                cursor_of({"decision_score": focus["decision_score"], "audit_id": focus["id"]}),
            )
    params = f.params()

    def link(row: dict[str, Any] | None) -> str | None:
        if row is None:
            return None
        q = urlencode({**params, "audit_id": row["audit_id"]})
        return f"/inspections/{row['inspection_id']}?{q}"

    ref = view.inspection["image_ref"]
    original_url = (
        f"/media/inspection/{inspection_id}/original" if ref and ref != "<inline>" else None
    )
    audits = []
    for a in view.audits:
        kept = ((a.get("details") or {}).get("maps") or {}).get("image")
        image_url = f"/media/audit/{a['id']}/image" if kept else original_url
        audits.append({**a, "score_rows": _score_rows(a), "maps": _maps(a), "image_url": image_url})
    return render(
        request,
        st,
        "inspection.html",
        view=view,
        inspection=view.inspection,
        audits=audits,
        focus=focus,
        prev_url=link(prev_row),
        next_url=link(next_row),
        filters=params,
        queue_url=f"/queue?{urlencode(params)}",
        original_url=original_url,
        problem=problem,
    )


@router.post("/inspections/{inspection_id}/verdict")
async def verdict(
    request: Request,
    inspection_id: str,
    who: ReviewerDep,
    st: StateDep,
) -> Response:
    """Record ``confirmed`` or ``cleared`` for the inspection (reviewer = the logged-in user),
    then open the next queue item (``return=next``, default) or go back (``return=queue``)."""
    from db.repository import record_verdict
    from db.session import session_scope
    from inspection_audit.web.queries import (
        BadFilter,
        Cursor,
        QueueFilter,
        neighbours,
        stored_id,
    )

    if not stored_id(inspection_id):
        raise HTTPException(404, f"no inspection {inspection_id!r}")
    form = await request.form()
    choice = str(form.get("verdict", ""))
    stored = {"confirmed": "confirmed_defect", "cleared": "cleared"}.get(choice)
    if stored is None:
        raise HTTPException(422, "verdict must be confirmed or cleared")
    note = str(form.get("note", "")).strip()[:2000] or None
    try:
        f = QueueFilter.from_params({k: str(v) for k, v in form.items()})
    except BadFilter:
        f = QueueFilter()
    at = Cursor.decode(str(form.get("cursor", "")))
    with session_scope(st.url) as session:
        try:
            record_verdict(session, inspection_id, stored, reviewer=who.name, note=note)
        except LookupError:
            raise HTTPException(404, f"no inspection {inspection_id!r}") from None
    target = _safe_next(str(form.get("return_to", "")) or None)
    if form.get("return") == "next" and at is not None:
        with session_scope(st.url) as session:
            _, nxt = neighbours(session, f, at)
        if nxt is not None:
            q = urlencode({**f.params(), "audit_id": nxt["audit_id"]})
            target = f"/inspections/{nxt['inspection_id']}?{q}"
        else:
            target = f"/queue?{urlencode(f.params())}"
    return RedirectResponse(target, status_code=303)


# --- overview and export -----------------------------------------------------------------------
@router.get("/overview")
def overview_page(
    request: Request,
    who: WhoDep,
    st: StateDep,
    days: Annotated[int, Query(ge=1, le=366)] = 30,
) -> Response:
    from db.session import session_scope
    from inspection_audit.web.plot import day_plot
    from inspection_audit.web.queries import overview

    with session_scope(st.url) as session:
        data = overview(session, days=days)
    return render(request, st, "overview.html", data=data, plot=day_plot(data["per_day"]))


@router.get("/export.zip")
def export_zip(
    who: ReviewerDep,
    st: StateDep,
    verdict: Annotated[list[str] | None, Query()] = None,
) -> Response:
    """The export (``inspection-audit export``) as a zip: ``manifest.csv`` and ``images/``."""
    from inspection_audit.web.export import ExportError, export_dataset

    tmp = Path(tempfile.mkdtemp(prefix="ia-export-"))
    try:
        verdict = verdict or ["confirmed"]
        result = export_dataset(st.url, st.settings, tmp / "dataset", verdict)
        archive = shutil.make_archive(str(tmp / "export"), "zip", tmp / "dataset")
    except ExportError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise HTTPException(422, str(exc)) from None
    except Exception:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    name = f"inspection-audit-{'-'.join(verdict or [])}-{len(result.rows)}.zip"
    return FileResponse(
        archive,
        media_type="application/zip",
        filename=name,
        background=BackgroundTask(shutil.rmtree, tmp, True),
    )
