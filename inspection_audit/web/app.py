"""The review station's FastAPI application: :func:`create_app`.

One app on the same settings and database as the workers: the reviewer's pages
(:mod:`inspection_audit.web.pages`), HTTP ingest (:mod:`inspection_audit.web.ingest`), the
review maps and originals (:mod:`inspection_audit.web.media`), ``/metrics`` and ``/healthz``.
Nothing answers without credentials except ``/healthz`` and the login form; request bodies are
bounded (:class:`BodyLimit`) as the producer bounds messages.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from starlette.middleware.sessions import SessionMiddleware

from inspection_audit.settings import Settings, get_settings
from inspection_audit.web.auth import load_accounts, session_secret
from inspection_audit.web.deps import NotAuthenticated, State, StateDep, WhoDep

TEMPLATES = Path(__file__).parent / "templates"
#: Bodies of every route but ingest (forms: a verdict, a note, a login).
FORM_BODY_LIMIT = 64 * 1024
#: Headroom of a multipart or JSON body over the image it carries (fields, boundaries).
BODY_OVERHEAD = 64 * 1024
SESSION_MAX_AGE_S = 12 * 3600

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


def ingest_body_limit(settings: Settings) -> int:
    """The largest ingest body: the image limit (``max_image_bytes`` with an upload folder,
    else ``max_inline_bytes``) as base64 (4/3), plus :data:`BODY_OVERHEAD`."""
    image = settings.max_image_bytes if settings.upload_dir else settings.max_inline_bytes
    return image * 4 // 3 + 4 + BODY_OVERHEAD


class _TooLarge(Exception):
    pass


class BodyLimit:
    """ASGI middleware: a body over the limit of its route is answered 413, whether it says
    its length (``Content-Length``) or streams it (counted as it arrives)."""

    def __init__(self, app: Any, ingest_limit: int, default_limit: int = FORM_BODY_LIMIT) -> None:
        self.app = app
        self.ingest_limit = ingest_limit
        self.default_limit = default_limit

    def limit_for(self, path: str) -> int:
        return self.ingest_limit if path.startswith("/api/v1/inspections") else self.default_limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope.get("path", ""))
        for key, value in scope.get("headers", []):
            if key == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = 0
                if declared > limit:
                    await self._reject(send, limit)
                    return
        seen = 0
        started = False

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise _TooLarge
            return message

        async def tracked(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counted, tracked)
        except _TooLarge:
            if not started:
                await self._reject(send, limit)

    @staticmethod
    async def _reject(send: Send, limit: int) -> None:
        body = json.dumps({"detail": f"request body over the limit of {limit} bytes"}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"connection", b"close")],
            }
        )
        await send({"type": "http.response.body", "body": body})


def read_engine(url: str) -> Any:
    """An autocommit engine without pre-ping for single-row lookups on PostgreSQL (one round
    trip each); SQLite shares :func:`db.session.make_engine`'s engine."""
    import sqlalchemy as sa
    from sqlalchemy.engine import make_url

    from db.session import make_engine

    if make_url(url).get_backend_name() != "postgresql":
        return make_engine(url)
    return sa.create_engine(url, isolation_level="AUTOCOMMIT", pool_size=4, max_overflow=8)


def _wants_html(request: Request) -> bool:
    path = request.url.path
    if path.startswith(("/api/", "/metrics", "/openapi.json", "/media/", "/static/")):
        return False
    return "text/html" in request.headers.get("accept", "")


def create_app(settings: Settings | None = None) -> FastAPI:
    """The review station for ``settings`` (default: :func:`get_settings`).

    Raises:
        inspection_audit.web.auth.AccountsError: malformed accounts.
        ValueError: an ``upload_dir`` outside every image root.
    """
    from inspection_audit.web import ingest, media, pages

    settings = settings or get_settings()
    if settings.upload_dir is not None:
        up = Path(settings.upload_dir).expanduser().resolve()
        if not any(up.is_relative_to(Path(r).resolve()) for r in settings.image_roots):
            raise ValueError(
                f"INSPECTION_AUDIT_UPLOAD_DIR {up} must lie inside an image root "
                f"(INSPECTION_AUDIT_IMAGE_ROOTS: {[str(r) for r in settings.image_roots]}): "
                "the workers read uploaded images from there"
            )
    app = FastAPI(
        title="inspection-audit",
        version="1",
        description="Review station and HTTP ingest of inspection-audit. Every route needs a "
        "session (reviewers) or `Authorization: Bearer <token>` (API clients), except "
        "`/healthz`.",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    templates = Jinja2Templates(directory=str(TEMPLATES))
    templates.env.globals["static_css"] = (Path(__file__).parent / "static" / "app.css").read_text
    app.state.ia = State(
        settings=settings,
        url=settings.resolved_database_url,
        accounts=load_accounts(settings),
        templates=templates,
        choices_cache={},
        read_engine=read_engine(settings.resolved_database_url),
    )
    app.add_middleware(
        SessionMiddleware,
        secret_key=session_secret(settings),
        session_cookie="ia_session",
        max_age=SESSION_MAX_AGE_S,
        same_site="strict",
        https_only=False,
    )
    app.add_middleware(BodyLimit, ingest_limit=ingest_body_limit(settings))

    @app.exception_handler(NotAuthenticated)
    async def _not_authenticated(request: Request, exc: NotAuthenticated) -> Response:
        if _wants_html(request):
            target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
            from urllib.parse import urlencode

            return RedirectResponse(f"/login?{urlencode({'next': target})}", status_code=303)
        return JSONResponse(
            {"detail": "not authenticated: log in, or send Authorization: Bearer <token>"},
            status_code=401,
            headers={"WWW-Authenticate": "Bearer"},
        )

    @app.get("/healthz", tags=["operations"], summary="Database and broker answer")
    def healthz(st: StateDep) -> JSONResponse:
        """200 when the database and the broker answer, else 503 (no credentials needed)."""
        from inspection_audit.web.broker import broker_ok
        from inspection_audit.web.health import database_error

        db = database_error(st.url)
        broker = broker_ok(st.settings)
        body = {"database": db or "ok", "broker": broker or "ok"}
        return JSONResponse(body, status_code=200 if db is None and broker is None else 503)

    @app.get(
        "/metrics",
        tags=["operations"],
        summary="Prometheus metrics",
        response_class=Response,
        responses={200: {"content": {"text/plain": {}}}, 401: {"description": "no credentials"}},
    )
    def metrics(who: WhoDep, st: StateDep) -> Response:
        """Audits, flags, verdicts, queue depth, lag: read from the database and the broker."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        from inspection_audit.web.metrics import registry_for

        return Response(generate_latest(registry_for(st.settings)), media_type=CONTENT_TYPE_LATEST)

    @app.get("/openapi.json", include_in_schema=False)
    def openapi(who: WhoDep) -> JSONResponse:
        return JSONResponse(app.openapi())

    app.include_router(ingest.router)
    app.include_router(media.router)
    app.include_router(pages.router)
    return app


def app_from_env() -> FastAPI:
    """The app for ``uvicorn --factory`` (``inspection-audit serve``): settings from the
    environment."""
    return create_app(get_settings())
