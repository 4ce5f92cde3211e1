"""What every route shares: the app's state, who is asking, the CSRF check."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, HTTPException, Request
from fastapi.templating import Jinja2Templates

from inspection_audit.settings import Settings
from inspection_audit.web.auth import Accounts, Identity, csrf_ok


@dataclass
class State:
    """The review station's state (``app.state.ia``): one settings object, its database URL,
    the accounts and the templates."""

    settings: Settings
    url: str
    accounts: Accounts
    templates: Jinja2Templates
    choices_cache: dict[str, Any]
    #: autocommit engine for the ingest's single-row lookups (PostgreSQL; on SQLite the
    #: shared engine of :func:`db.session.make_engine`)
    read_engine: Any = None


def state(request: Request) -> State:
    """The app's :class:`State`."""
    st: State = request.app.state.ia
    return st


class NotAuthenticated(Exception):
    """No valid session and no valid bearer token (the handler answers 401 or redirects)."""

    def __init__(self, bearer: bool = False) -> None:
        super().__init__("not authenticated")
        self.bearer = bearer


def current_identity(request: Request, st: StateDep) -> Identity:
    """The reviewer of the session cookie, or the API client of the ``Bearer`` token.

    Raises:
        NotAuthenticated: neither is valid (a bad bearer token is never tried as a session;
            an ``Authorization`` header of another scheme is left to the proxy that asked for
            it).
    """
    header = request.headers.get("authorization")
    if header:
        scheme, _, token = header.partition(" ")
        if scheme.lower() == "bearer":
            owner = st.accounts.token_owner(token.strip())
            if owner is not None:
                return Identity(owner, "token")
            raise NotAuthenticated(bearer=True)
        # another scheme (a proxy's Basic auth in front of the station) is not ours to check:
        # the reviewer's session still decides
    user = request.session.get("user")
    if isinstance(user, str) and user in st.accounts.users:
        return Identity(user, "user")
    raise NotAuthenticated()


async def csrf_checked(request: Request, who: WhoDep) -> Identity:
    """For a POST made with a session cookie: the session's CSRF token must come back, in the
    ``X-CSRF-Token`` header or the form's ``csrf_token`` field (403 otherwise). A bearer-token
    request carries no cookie and needs none."""
    if who.kind == "token" or request.method in ("GET", "HEAD", "OPTIONS"):
        return who
    given = request.headers.get("x-csrf-token")
    if given is None and request.headers.get("content-type", "").startswith(
        ("application/x-www-form-urlencoded", "multipart/form-data")
    ):
        form = await request.form()
        value = form.get("csrf_token")
        given = value if isinstance(value, str) else None
    if not csrf_ok(request.session, given):
        raise HTTPException(403, "missing or wrong CSRF token; reload the page and try again")
    return who


async def reviewer_only(who: CsrfDep) -> Identity:
    """A logged-in reviewer (session), not an API token: verdicts name a person, and the export
    hands out the reviewed images; a line gateway's or a Prometheus scraper's token may ingest
    and read, never decide (403 otherwise)."""
    if who.kind != "user":
        raise HTTPException(
            403, "verdicts and exports are for logged-in reviewers, not for API tokens"
        )
    return who


#: Route parameters (FastAPI's ``Annotated`` dependencies).
StateDep = Annotated[State, Depends(state)]
WhoDep = Annotated[Identity, Depends(current_identity)]
CsrfDep = Annotated[Identity, Depends(csrf_checked)]
ReviewerDep = Annotated[Identity, Depends(reviewer_only)]
