"""HTTP ingest for line software: ``POST /api/v1/inspections`` and ``GET …/{inspection_id}``.

Validation **is the producer's**: every message goes through
:func:`producer.api.prepare_message` and :func:`producer.api.enqueue_many`, so the HTTP API and
the Python API cannot drift apart; a :class:`producer.schema.MessageError` becomes a 422 whose
``detail`` lists each ``{"field", "reason"}``.

Two bodies are accepted:

* ``application/json``: the message in its wire form (``docs/design.md`` §5): a path under
  the image roots (``image_path``) or the bytes inline (``image_b64``, at most
  ``INSPECTION_AUDIT_MAX_INLINE_BYTES`` decoded);
* ``multipart/form-data``: the message fields as form fields and the image file as ``image``.

**Where an uploaded image goes.** With ``INSPECTION_AUDIT_UPLOAD_DIR`` set (a folder inside an
image root) every uploaded image (a multipart file, or inline JSON bytes) is written there as
``<upload_dir>/<YYYY-MM-DD>/<inspection_id>-<sha256[:12]><suffix>`` and the message carries its
path: messages stay small, multipart files may be as large as ``max_image_bytes``, and the
review page and ``export`` can show and copy the original. Without it a multipart file travels
inline as base64 (so within ``max_inline_bytes``) and only the worker's review-map copy of the
image is kept.

**Idempotent.** An ``inspection_id`` that already has its ``done`` row, or waits in the outbox,
is answered 202 with ``"status": "duplicate"`` and not sent again; one whose rows are all
``error`` is sent again (a late success replaces the error row); one sent twice at the same
moment reaches the worker twice, which writes one row (the upsert, docs/design.md §6).
"""

from __future__ import annotations

import base64
import hashlib
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Request
from fastapi import Path as PathParam
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from inspection_audit.web.deps import CsrfDep, State, StateDep, WhoDep
from producer.schema import INSPECTION_ID_PATTERN, InspectionMessage

router = APIRouter(prefix="/api/v1", tags=["inspections"])

#: Form fields of a multipart upload that are numbers on the wire.
_FLOAT_FIELDS = ("score",)
_INT_FIELDS = ("schema_version",)
#: Suffixes kept for uploaded files (anything else is stored as ``.img``).
SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}


class FieldError(BaseModel):
    field: str
    reason: str


class Rejected(BaseModel):
    """422: the message is not valid; nothing was sent."""

    detail: list[FieldError]
    inspection_id: str | None = None


class Accepted(BaseModel):
    """202: the broker has the message (``queued``), or its row already exists (``duplicate``)."""

    inspection_id: str
    status: str
    location: str


class AuditOut(BaseModel):
    model_version: str
    method: str
    status: str
    error: str | None = None
    p_defect: float | None = None
    decision_score: float | None = None
    tau: float | None = None
    suspected_false_negative: bool
    scores: dict[str, float | None] | None = None
    audited_at: datetime | None = None


class VerdictOut(BaseModel):
    verdict: str
    reviewer: str | None = None
    note: str | None = None
    created_at: datetime | None = None


class InspectionOut(BaseModel):
    """An inspection as audited so far: ``status`` is ``audited`` (every audit row ``done``),
    ``error`` (some row is an error) — ``audits`` has each row's scores."""

    inspection_id: str
    status: str
    line: str | None = None
    station: str | None = None
    captured_at: datetime
    prediction: str
    score: float
    audits: list[AuditOut]
    verdict: VerdictOut | None = None


class NotFound(BaseModel):
    detail: str
    inspection_id: str
    status: str = "unknown"


def _message_schema() -> dict[str, Any]:
    schema = InspectionMessage.model_json_schema()
    schema.pop("title", None)
    return schema


def _multipart_schema() -> dict[str, Any]:
    props = {
        k: v
        for k, v in _message_schema()["properties"].items()
        if k not in ("image_b64", "image_path")
    }
    props["image"] = {"type": "string", "format": "binary", "description": "the image file"}
    props["image_path"] = {"type": "string", "description": "instead of a file: a path"}
    return {
        "type": "object",
        "properties": props,
        "required": ["inspection_id", "prediction", "score", "line", "station", "captured_at"],
    }


INGEST_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": _message_schema()},
            "multipart/form-data": {"schema": _multipart_schema()},
        },
    }
}


def _reject(
    errors: list[tuple[str, str]], iid: str | None = None, status: int = 422
) -> JSONResponse:
    body = Rejected(detail=[FieldError(field=f, reason=r) for f, r in errors], inspection_id=iid)
    return JSONResponse(body.model_dump(), status_code=status)


def _form_fields(form: Any) -> tuple[dict[str, Any], Any, str]:
    """The message fields of a multipart form (numbers converted), its ``image`` upload (or
    None) and the upload's file name."""
    fields: dict[str, Any] = {}
    data: Any = None
    filename = ""
    for key, value in form.multi_items():
        if key == "image" and not isinstance(value, str):
            data, filename = value, value.filename or ""
            continue
        if not isinstance(value, str):
            fields[key] = "<file>"
            continue
        if value == "" and key not in ("inspection_id", "line", "station"):
            continue
        if key in _FLOAT_FIELDS:
            try:
                fields[key] = float(value)
                continue
            except ValueError:
                pass
        if key in _INT_FIELDS and value.strip().isdigit():
            fields[key] = int(value)
            continue
        fields[key] = value
    return fields, data, filename


async def _read_body(request: Request) -> tuple[Any, bytes | None, str, bool] | JSONResponse:
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        try:
            form = await request.form(max_files=1, max_fields=32, max_part_size=64 * 1024)
        except Exception as exc:
            return _reject([("", f"cannot read the multipart body: {exc}")])
        fields, upload, filename = _form_fields(form)
        data = await upload.read() if upload is not None else None
        return fields, data, filename, True
    if ctype in ("application/json", ""):
        raw = await request.body()
        try:
            return json.loads(raw), None, "", False
        except (ValueError, UnicodeDecodeError) as exc:
            return _reject([("", f"the body is not valid JSON ({exc})")])
    return _reject(
        [("", f"unsupported content type {ctype!r}: send application/json or multipart/form-data")],
        status=415,
    )


def _persist(upload_dir: Path, iid: str, data: bytes, suffix: str) -> Path:
    from worker.model.naming import safe_name

    digest = hashlib.sha256(data).hexdigest()[:12]
    day = datetime.now(UTC).strftime("%Y-%m-%d")
    suffix = suffix.lower() if suffix.lower() in SUFFIXES else ".img"
    path = upload_dir / day / f"{safe_name(iid)}-{digest}{suffix}"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
    return path


def _exists(st: State, iid: str) -> bool:
    """Whether ``iid`` was taken before: it has a ``done`` audit row, or it waits in the outbox
    (queued, no audit row yet). An inspection whose rows are all ``error`` (say its file was
    not on the workers' mount yet) is not taken: sending it again lets a late success replace
    the error row (docs/design.md §6). One query on the app's autocommit read engine (no
    transaction, no pre-ping round trip; a connection the server dropped is retried once)."""
    import sqlalchemy as sa

    from db.models import Audit, OutboxEntry

    a = Audit.__table__.c
    stmt = (
        sa.select(a.inspection_id)
        .where(a.inspection_id == iid, a.status == "done")
        .union_all(
            sa.select(OutboxEntry.inspection_id).where(
                OutboxEntry.inspection_id == iid, ~sa.exists().where(a.inspection_id == iid)
            )
        )
    )
    for attempt in (1, 2):
        try:
            with st.read_engine.connect() as conn:
                return conn.execute(stmt).first() is not None
        except sa.exc.DBAPIError as exc:
            if attempt == 2 or not exc.connection_invalidated:
                raise
    return False


def accept(
    st: State, payload: Any, data: bytes | None, filename: str, multipart: bool
) -> JSONResponse:
    """Validate (the producer's rules), de-duplicate, keep the upload, send. Blocking."""
    from producer.api import EnqueueError, enqueue_many, prepare_message
    from producer.outbox import OutboxError
    from producer.schema import MessageError

    s = st.settings
    if multipart and data is not None and isinstance(payload, dict):
        payload = {**payload, "image_b64": base64.b64encode(data).decode("ascii")}
    check = s
    if multipart and s.upload_dir is not None:
        check = s.model_copy(update={"max_inline_bytes": s.max_image_bytes})

    def field(name: str) -> str:
        return "image" if multipart and name.startswith("image_b64") else name

    try:
        msg = prepare_message(payload, check)
    except MessageError as exc:
        return _reject([(field(f), r) for f, r in exc.errors], exc.inspection_id)
    iid = msg.inspection_id
    location = f"/api/v1/inspections/{iid}"
    if _exists(st, iid):
        return JSONResponse(
            Accepted(inspection_id=iid, status="duplicate", location=location).model_dump(),
            status_code=202,
            headers={"Location": location},
        )
    written: Path | None = None
    if s.upload_dir is not None and msg.image_b64 is not None:
        written = _persist(Path(s.upload_dir), iid, msg.image_bytes(), Path(filename).suffix)
        try:
            msg = prepare_message(
                msg.model_copy(update={"image_path": str(written), "image_b64": None}), s
            )
        except MessageError as exc:
            written.unlink(missing_ok=True)
            return _reject([(field(f), r) for f, r in exc.errors], iid)
    try:
        # The HTTP ingest can always reach the database: every inspection is recorded as
        # queued in the outbox before it is sent, so `inspection-audit reconcile` can resend
        # what a broker loses.
        enqueue_many([msg], settings=s, outbox=True)
    except (EnqueueError, OutboxError) as exc:
        if written is not None:
            written.unlink(missing_ok=True)
        return JSONResponse(
            {"detail": f"the broker did not take the message: {exc}", "inspection_id": iid},
            status_code=503,
            headers={"Retry-After": "5"},
        )
    return JSONResponse(
        Accepted(inspection_id=iid, status="queued", location=location).model_dump(),
        status_code=202,
        headers={"Location": location},
    )


@router.post(
    "/inspections",
    status_code=202,
    response_model=Accepted,
    responses={
        401: {"description": "no or a wrong bearer token"},
        403: {"description": "a session request without its CSRF token"},
        413: {"description": "the body is over the limit"},
        415: {"description": "neither JSON nor multipart", "model": Rejected},
        422: {"description": "not a valid message; nothing was sent", "model": Rejected},
        503: {"description": "the broker did not take it; try again"},
    },
    openapi_extra=INGEST_BODY,
    summary="Send one inspection to be audited",
)
async def ingest(
    request: Request,
    who: CsrfDep,
    st: StateDep,
) -> JSONResponse:
    """Validate one inspection message and put it on the audit queue (202 with its
    ``inspection_id``). Send JSON (``image_path`` under the image roots, or ``image_b64``) or
    ``multipart/form-data`` (the fields, and the file as ``image``)."""
    read = await _read_body(request)
    if isinstance(read, JSONResponse):
        return read
    payload, data, filename, multipart = read
    return await run_in_threadpool(accept, st, payload, data, filename, multipart)


def inspection_out(st: State, iid: str) -> InspectionOut | None:
    """The API's view of one inspection, or None when it has no row yet."""
    from db.session import session_scope
    from inspection_audit.web.queries import inspection_view

    with session_scope(st.url) as session:
        view = inspection_view(session, iid)
    if view is None:
        return None
    i = view.inspection
    audits = [
        AuditOut.model_validate({**a, "audited_at": a.get("created_at")}) for a in view.audits
    ]
    status = "error" if any(a.status == "error" for a in audits) else "audited"
    v = view.verdict
    return InspectionOut(
        inspection_id=i["inspection_id"],
        status=status,
        line=i["line"],
        station=i["station"],
        captured_at=i["captured_at"],
        prediction=i["prediction"],
        score=i["score"],
        audits=audits,
        verdict=VerdictOut.model_validate(v) if v else None,
    )


@router.get(
    "/inspections/{inspection_id}",
    response_model=InspectionOut,
    responses={
        401: {"description": "not authenticated"},
        404: {"description": "no row yet (still queued, or never sent)", "model": NotFound},
    },
    summary="The audit of one inspection",
)
def get_inspection(
    inspection_id: Annotated[str, PathParam(max_length=128, pattern=INSPECTION_ID_PATTERN)],
    who: WhoDep,
    st: StateDep,
) -> Any:
    """The inspection's audit rows (status, every score, the decision) and its verdict."""
    out = inspection_out(st, inspection_id)
    if out is None:
        queued = _exists(st, inspection_id)  # no inspection row, so: waiting in the outbox
        return JSONResponse(
            NotFound(
                detail="queued (in the outbox), not audited yet"
                if queued
                else "no such inspection: never sent here",
                inspection_id=inspection_id,
                status="queued" if queued else "unknown",
            ).model_dump(),
            status_code=404,
        )
    return out
