"""Accounts, password and token hashes, sessions and CSRF tokens of the review station.

* **Reviewers** log in with a name and a password. Accounts come from
  ``INSPECTION_AUDIT_WEB_USERS`` (``name:hash,...``) and from a file of ``name:hash`` lines
  (``INSPECTION_AUDIT_WEB_USERS_FILE``, default ``<home>/web-users`` when it exists). A hash is
  ``scrypt$<n>$<r>$<p>$<salt>$<key>`` (:func:`hash_password`, standard library
  ``hashlib.scrypt``, salt and key base64): ``inspection-audit web hash-password`` makes one.
* **API clients** (line software, Prometheus) send ``Authorization: Bearer <token>``. Tokens
  come from ``INSPECTION_AUDIT_API_TOKENS`` and a file (``INSPECTION_AUDIT_API_TOKENS_FILE``,
  default ``<home>/api-tokens``), stored as ``name:sha256$<hex>`` (:func:`hash_token`; a token is
  32 random bytes, so a fast hash is safe) or as an scrypt hash (verified once, then cached).
* **Sessions** are signed cookies (Starlette's ``SessionMiddleware``, key
  ``INSPECTION_AUDIT_WEB_SECRET``, else a random key kept in ``<home>/web-secret``).
* **CSRF**: each session holds a random token; every form carries it (``csrf_token``) and every
  POST made with a session cookie must send it back (form field or ``X-CSRF-Token`` header).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import os
import secrets
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from inspection_audit.settings import Settings

SCRYPT_N = 2**14
SCRYPT_R = 8
SCRYPT_P = 1
SCRYPT_DKLEN = 32
#: Shortest session secret accepted from the secret file.
MIN_SECRET_CHARS = 16
NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._@-")


class AccountsError(ValueError):
    """An account entry that cannot be used; the message names where it came from."""


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def hash_password(password: str, *, n: int = SCRYPT_N) -> str:
    """``scrypt$n$r$p$salt$key`` for ``password`` (16-byte random salt).

    Raises:
        ValueError: an empty password.
    """
    if not password:
        raise ValueError("the password must not be empty")
    salt = secrets.token_bytes(16)
    key = hashlib.scrypt(
        password.encode(), salt=salt, n=n, r=SCRYPT_R, p=SCRYPT_P, dklen=SCRYPT_DKLEN
    )
    return f"scrypt${n}${SCRYPT_R}${SCRYPT_P}${_b64(salt)}${_b64(key)}"


def verify_password(password: str, encoded: str) -> bool:
    """True when ``password`` matches ``encoded`` (an scrypt or sha256 hash); constant time.
    A malformed hash never matches."""
    try:
        kind, *parts = encoded.split("$")
        if kind == "scrypt":
            n, r, p, salt, key = parts
            want = base64.b64decode(key)
            got = hashlib.scrypt(
                password.encode(),
                salt=base64.b64decode(salt),
                n=int(n),
                r=int(r),
                p=int(p),
                dklen=len(want),
                maxmem=256 * 1024 * 1024,
            )
            return hmac.compare_digest(got, want)
        if kind == "sha256":
            (hexdigest,) = parts
            return hmac.compare_digest(hashlib.sha256(password.encode()).hexdigest(), hexdigest)
    except (ValueError, TypeError):
        return False
    return False


def new_token() -> str:
    """A new API token: 32 random bytes, URL-safe base64."""
    return secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    """``sha256$<hex>`` of a token."""
    return f"sha256${hashlib.sha256(token.encode()).hexdigest()}"


def parse_entries(entries: Iterable[str], where: str) -> dict[str, str]:
    """``name:hash`` entries (blank lines and ``#`` comments skipped) → name → hash.

    Raises:
        AccountsError: an entry without ``:``, a bad name, an unknown hash kind, a duplicate.
    """
    out: dict[str, str] = {}
    for n, raw in enumerate(entries, 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, encoded = line.partition(":")
        name, encoded = name.strip(), encoded.strip()
        if not sep or not name or not encoded:
            raise AccountsError(f"{where} entry {n}: expected name:hash")
        if not set(name) <= NAME_CHARS or len(name) > 64:
            raise AccountsError(f"{where} entry {n}: bad name {name!r} (letters, digits, ._@-)")
        if encoded.split("$", 1)[0] not in ("scrypt", "sha256"):
            raise AccountsError(
                f"{where} entry {n} ({name}): the hash must start with scrypt$ or sha256$ "
                "(make one with `inspection-audit web hash-password`)"
            )
        if name in out:
            raise AccountsError(f"{where}: {name!r} is given twice")
        out[name] = encoded
    return out


def users_file(settings: Settings) -> Path:
    """The reviewer accounts file: ``web_users_file``, else ``<home>/web-users``."""
    return Path(settings.web_users_file or settings.home / "web-users").expanduser()


def tokens_file(settings: Settings) -> Path:
    """The API tokens file: ``api_tokens_file``, else ``<home>/api-tokens``."""
    return Path(settings.api_tokens_file or settings.home / "api-tokens").expanduser()


def _read_file(path: Path, explicit: bool) -> list[str]:
    if not path.exists():
        if explicit:
            raise AccountsError(f"accounts file {path} does not exist")
        return []
    try:
        return path.read_text().splitlines()
    except OSError as exc:
        raise AccountsError(f"cannot read accounts file {path}: {exc}") from exc


Kind = Literal["user", "token"]


@dataclass(frozen=True)
class Identity:
    """Who made a request: a reviewer (session) or an API client (token)."""

    name: str
    kind: Kind


@dataclass
class Accounts:
    """Reviewer password hashes and API token hashes, by name."""

    users: dict[str, str] = field(default_factory=dict)
    tokens: dict[str, str] = field(default_factory=dict)
    _fast: dict[str, str] = field(default_factory=dict, repr=False)
    _verified: dict[str, str] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        self._fast = {
            h.split("$", 1)[1]: name for name, h in self.tokens.items() if h.startswith("sha256$")
        }

    def check_password(self, name: str, password: str) -> bool:
        """True when ``name`` is a reviewer and ``password`` is theirs."""
        encoded = self.users.get(name)
        if encoded is None:
            verify_password(password, hash_password("decoy", n=2**10))  # similar timing
            return False
        return verify_password(password, encoded)

    def token_owner(self, token: str) -> str | None:
        """The name of the API client whose token this is, or None."""
        if not token:
            return None
        digest = hashlib.sha256(token.encode()).hexdigest()
        name = self._fast.get(digest)
        if name is not None:
            return name
        with self._lock:
            if digest in self._verified:
                return self._verified[digest]
        for owner, encoded in self.tokens.items():
            if encoded.startswith("scrypt$") and verify_password(token, encoded):
                with self._lock:
                    self._verified[digest] = owner
                return owner
        return None


def load_accounts(settings: Settings) -> Accounts:
    """Reviewer accounts and API tokens from the settings and their files.

    Raises:
        AccountsError: a malformed entry, a name given twice, or an explicitly named file
            that is missing or unreadable.
    """
    users = parse_entries(settings.web_users, "INSPECTION_AUDIT_WEB_USERS")
    path = users_file(settings)
    for name, h in parse_entries(
        _read_file(path, settings.web_users_file is not None), str(path)
    ).items():
        if name in users:
            raise AccountsError(f"reviewer {name!r} is in INSPECTION_AUDIT_WEB_USERS and {path}")
        users[name] = h
    tokens = parse_entries(settings.api_tokens, "INSPECTION_AUDIT_API_TOKENS")
    tpath = tokens_file(settings)
    for name, h in parse_entries(
        _read_file(tpath, settings.api_tokens_file is not None), str(tpath)
    ).items():
        if name in tokens:
            raise AccountsError(
                f"API client {name!r} is in INSPECTION_AUDIT_API_TOKENS and {tpath}"
            )
        tokens[name] = h
    return Accounts(users, tokens)


def append_entry(path: Path, name: str, encoded: str) -> None:
    """Add ``name:encoded`` to an accounts file (created with mode 0600).

    Raises:
        AccountsError: the name is already in the file, or is not a valid name.
    """
    existing = parse_entries(_read_file(path, False), str(path))
    if name in existing:
        raise AccountsError(f"{name!r} is already in {path}")
    parse_entries([f"{name}:{encoded}"], "new entry")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    with os.fdopen(fd, "a") as fh:
        fh.write(f"{name}:{encoded}\n")


def session_secret(settings: Settings) -> str:
    """The key that signs session cookies: ``web_secret``, else ``<home>/web-secret`` (made
    once with 32 random bytes, mode 0600, so restarts and several server processes share it)."""
    if settings.web_secret is not None and settings.web_secret.get_secret_value():
        return settings.web_secret.get_secret_value()
    path = settings.home.expanduser() / "web-secret"
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        # written in full to a private temporary file, then linked into place: the secret
        # file never exists half-written, and of two processes racing only one link wins
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "w") as fh:
                fh.write(secrets.token_urlsafe(32) + "\n")
            try:
                os.link(tmp, path)
            except FileExistsError:
                pass  # another process linked first: its secret is the one
            except OSError:  # a filesystem without hard links: create it exclusively
                with contextlib.suppress(FileExistsError):
                    out = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                    with os.fdopen(out, "w") as fh:
                        fh.write(tmp.read_text())
        finally:
            tmp.unlink(missing_ok=True)
    secret = path.read_text().strip()
    if len(secret) < MIN_SECRET_CHARS:
        raise AccountsError(
            f"session secret file {path} holds {len(secret)} character(s), fewer than "
            f"{MIN_SECRET_CHARS}: anyone could sign a session cookie with it. Delete the file "
            "(a new random key is made) or set INSPECTION_AUDIT_WEB_SECRET"
        )
    return secret


def csrf_token(session: dict[str, object]) -> str:
    """This session's CSRF token (made on first use)."""
    token = session.get("csrf")
    if not isinstance(token, str) or len(token) < 20:
        token = secrets.token_urlsafe(32)
        session["csrf"] = token
    return token


def csrf_ok(session: dict[str, object], given: str | None) -> bool:
    """True when ``given`` is this session's CSRF token (constant-time comparison)."""
    want = session.get("csrf")
    return isinstance(want, str) and bool(given) and hmac.compare_digest(want, str(given))
