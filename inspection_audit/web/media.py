"""Images and maps for the pages, served only from the configured folders.

Every file is resolved (symlinks followed) and must lie inside the results directory (review
maps) or an image root (originals); anything else, including a path that climbs out with
``..``, is a 404, never an error that says why.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import FileResponse

from inspection_audit.web.deps import StateDep, current_identity

router = APIRouter(dependencies=[Depends(current_identity)])

#: Content types by suffix (anything else is served as bytes, never as HTML).
TYPES = {
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".bmp": "image/bmp",
    ".tif": "image/tiff",
    ".tiff": "image/tiff",
    ".webp": "image/webp",
}


def confined(path: Path, roots: list[Path]) -> Path | None:
    """``path`` resolved, when it is a regular file inside one of ``roots``; else None."""
    try:
        real = Path(path).resolve(strict=True)
    except (OSError, RuntimeError, ValueError):
        return None
    for root in roots:
        try:
            if real.is_relative_to(Path(root).resolve()) and real.is_file():
                return real
        except (OSError, ValueError):
            continue
    return None


def _file(path: Path | None) -> FileResponse:
    if path is None:
        raise HTTPException(404, "not found")
    return FileResponse(
        path,
        media_type=TYPES.get(path.suffix.lower(), "application/octet-stream"),
        headers={"Cache-Control": "private, max-age=3600", "X-Content-Type-Options": "nosniff"},
    )


@router.get("/media/audit/{audit_id}/{name}", include_in_schema=False)
def audit_map(audit_id: int, name: str, st: StateDep) -> FileResponse:
    """A review map of an audit: ``composite`` (the queue's thumbnail) or a map's name."""
    from db.session import session_scope
    from inspection_audit.web.queries import MAX_ID, audit_by_id

    if not 0 <= audit_id <= MAX_ID:
        raise HTTPException(404, "not found")
    with session_scope(st.url) as session:
        row = audit_by_id(session, audit_id)
    if row is None:
        raise HTTPException(404, "not found")
    if name == "composite":
        ref = row.get("overlay_path")
    else:
        ref = ((row.get("details") or {}).get("maps") or {}).get(name)
    if not ref:
        raise HTTPException(404, "not found")
    return _file(confined(Path(ref), [st.settings.resolved_results_dir]))


@router.get("/media/inspection/{inspection_id}/original", include_in_schema=False)
def original(inspection_id: str, st: StateDep) -> FileResponse:
    """The inspection's image file, from the image roots."""
    import sqlalchemy as sa

    from db.models import Inspection
    from db.session import session_scope
    from inspection_audit.web.queries import stored_id
    from worker.model.images import ImageError, resolve_under_roots

    if not stored_id(inspection_id):
        raise HTTPException(404, "not found")
    with session_scope(st.url) as session:
        ref = session.execute(
            sa.select(Inspection.image_ref).where(Inspection.inspection_id == inspection_id)
        ).scalar()
    if not ref or ref == "<inline>":
        raise HTTPException(404, "not found")
    try:
        path = resolve_under_roots(ref, list(st.settings.image_roots))
    except ImageError:
        raise HTTPException(404, "not found") from None
    return _file(confined(path, list(st.settings.image_roots)))


@router.get("/results/{path:path}", include_in_schema=False)
def results_file(path: str, request: Request, st: StateDep) -> FileResponse:
    """A file under the results directory by its relative path (the paths the CLI prints)."""
    root = st.settings.resolved_results_dir
    return _file(confined(root / path, [root]))
