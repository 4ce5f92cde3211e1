"""The inspection message (schema version 1): what a line sends and what a worker reads.

One message asks for one inspection to be audited. On the wire it is the JSON object made by
:meth:`InspectionMessage.to_json_dict`, passed as the single positional argument of the Celery
task ``worker.app.TASK_NAME`` with the JSON serializer (never pickle)::

    {"schema_version": 1,
     "inspection_id": "L1-000123",             # the line's own id, unique per inspection
     "image_path": "2024/06/01/000123.png",    # relative to the first image root, or absolute
     "image_b64": null,                        # ... or the encoded image bytes, base64 (RFC 4648)
     "image_sha256": "9f86d0...",              # optional, hex SHA-256 of the image bytes
     "prediction": "ok",                       # the production model's call: "ok" | "defect"
     "score": 0.031,                           # the production model's P(defect), in [0, 1]
     "line": "L1", "station": "S3",
     "captured_at": "2024-06-01T08:15:02.123000+02:00",   # ISO 8601, always with an offset
     "model_version": "resnet18-0a1b2c3d4e5f"}             # or null

Validation errors are reported by :func:`parse_message` as :class:`MessageError`, which names
the field and the reason. Limits that depend on the deployment (the decoded size of inline
bytes) are checked when a ``Settings`` object is given, either in the validation context
(``InspectionMessage.model_validate(d, context={"settings": s})``) or by an explicit call of
:meth:`InspectionMessage.validate_limits`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import math
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from db.rows import storable_text, text_problem

if TYPE_CHECKING:
    from inspection_audit.settings import Settings

SCHEMA_VERSION: Literal[1] = 1
"""The schema version this code writes and reads."""

INSPECTION_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]*$"
Prediction = Literal["ok", "defect"]


class MessageError(ValueError):
    """An inspection message that is not valid.

    ``str(err)`` names each offending field and the reason, e.g.
    ``"invalid inspection message: score: Input should be less than or equal to 1 (got 1.5)"``.

    Attributes:
        field: the first offending field (dotted for nested locations; ``""`` for the
            message as a whole).
        reason: the reason for that field.
        errors: every ``(field, reason)`` pair.
        inspection_id: the message's ``inspection_id`` when it could be read, else ``None``.
        index: position of the message in a batch (set by ``enqueue_many``), else ``None``.
    """

    def __init__(
        self,
        errors: list[tuple[str, str]],
        *,
        inspection_id: str | None = None,
        index: int | None = None,
    ) -> None:
        if not errors:
            errors = [("", "invalid message")]
        self.errors = list(errors)
        self.field, self.reason = self.errors[0]
        self.inspection_id = inspection_id
        self.index = index
        super().__init__(self._render())

    def _render(self) -> str:
        where = []
        if self.index is not None:
            where.append(f"message {self.index}")
        if self.inspection_id is not None:
            where.append(f"inspection_id {_short_id(self.inspection_id)}")
        head = "invalid inspection message" + (f" ({', '.join(where)})" if where else "")
        body = "; ".join(f"{f}: {r}" if f else r for f, r in self.errors)
        return storable_text(f"{head}: {body}")

    def located(
        self, *, index: int | None = None, inspection_id: str | None = None
    ) -> MessageError:
        """A copy of this error that also says where in a batch it happened."""
        return MessageError(
            self.errors,
            inspection_id=inspection_id if inspection_id is not None else self.inspection_id,
            index=index if index is not None else self.index,
        )

    @classmethod
    def from_validation_error(
        cls, exc: ValidationError, inspection_id: str | None = None
    ) -> MessageError:
        errors: list[tuple[str, str]] = []
        for e in exc.errors(include_url=False):
            loc = ".".join(str(p) for p in e["loc"])
            msg = str(e["msg"])
            if msg.startswith("Value error, "):
                msg = msg[len("Value error, ") :]
            if not loc:
                loc = _MODEL_ERROR_FIELDS.get(e["type"], "")
            if e["type"] == "extra_forbidden":
                msg = "unknown field (this schema_version 1 message does not have it)"
            elif e["type"] not in _NO_INPUT_ECHO and "input" in e and not _is_big(e["input"]):
                msg = f"{msg} (got {e['input']!r})"
            errors.append((loc, msg))
        return cls(errors, inspection_id=inspection_id)


# Error types whose message already says what was wrong with the input.
_NO_INPUT_ECHO = {"missing", "value_error", "one_image", "sha256_mismatch"}
# Errors of the message as a whole, reported under the fields they concern.
_MODEL_ERROR_FIELDS = {"one_image": "image_path|image_b64", "sha256_mismatch": "image_sha256"}


def _short_id(inspection_id: str, limit: int = 40) -> str:
    """``repr(inspection_id)``, cut when long (an over-long id is not repeated whole)."""
    if len(inspection_id) <= limit:
        return repr(inspection_id)
    return f"{inspection_id[: limit - 8]!r}… ({len(inspection_id)} characters)"


def _is_big(value: Any) -> bool:
    return isinstance(value, (str, bytes, dict, list)) and len(value) > 80


def _settings_from(info: ValidationInfo) -> Settings | None:
    ctx = info.context
    if isinstance(ctx, Mapping):
        s = ctx.get("settings")
        return s if hasattr(s, "max_inline_bytes") else None
    return None


class InspectionMessage(BaseModel):
    """One inspection to audit (schema version 1). Immutable; unknown fields are refused.

    Fields:
        schema_version: always ``1``.
        inspection_id: the line's own id, 1–128 characters matching
            ``^[A-Za-z0-9][A-Za-z0-9._:-]*$``. Results are keyed by it (with model version and
            method), so sending the same id twice audits it once.
        image_path: the image file, relative to the first configured image root or absolute
            under one of the roots. The worker resolves it under *its own* roots
            (symlinks resolved) and refuses anything outside them.
        image_b64: the encoded image file (PNG, JPEG, ...) inline, standard base64. Decoded
            size at most ``Settings.max_inline_bytes`` bytes.
            Exactly one of ``image_path`` / ``image_b64`` is given.
        image_sha256: optional lowercase hex SHA-256 of the image bytes; checked against
            inline bytes here, and against the file by a worker that reads it.
        prediction: the production model's call, ``"ok"`` or ``"defect"``.
        score: the production model's P(defect), a finite number in [0, 1] (unitless
            probability; NaN, ±inf and booleans are refused).
        line, station: where the image was taken; 1–64 characters, not only whitespace.
        captured_at: when the image was taken; timezone-aware (a naive datetime is refused),
            ISO 8601 with an offset on the wire.
        model_version: the production model version the line ran, if known.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: Literal[1] = SCHEMA_VERSION
    inspection_id: str = Field(min_length=1, max_length=128, pattern=INSPECTION_ID_PATTERN)
    image_path: str | None = Field(default=None, min_length=1, max_length=4096)
    image_b64: str | None = Field(default=None, min_length=1)
    image_sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")
    prediction: Prediction
    score: float = Field(strict=True, ge=0.0, le=1.0, allow_inf_nan=False)
    line: str = Field(min_length=1, max_length=64)
    station: str = Field(min_length=1, max_length=64)
    captured_at: datetime
    model_version: str | None = Field(default=None, min_length=1, max_length=128)

    # --- field checks ---------------------------------------------------------------------
    @field_validator("*", mode="before")
    @classmethod
    def _storable(cls, v: Any) -> Any:
        """Text a database cannot store is refused here, naming the field, not by the
        database when the row is written (PostgreSQL refuses NUL; unpaired surrogates, which
        JSON can carry as ``\\ud800``, are not UTF-8)."""
        if isinstance(v, str):
            problem = text_problem(v)
            if problem is not None:
                raise ValueError(f"{problem} (text must not contain NUL or unpaired surrogates)")
        return v

    @field_validator("score", mode="before")
    @classmethod
    def _score_is_a_number(cls, v: Any) -> Any:
        if isinstance(v, bool):
            raise ValueError("score must be a number in [0, 1], not a boolean")
        if isinstance(v, float) and not math.isfinite(v):
            raise ValueError(f"score must be a finite number in [0, 1], got {v!r}")
        return v

    @field_validator("line", "station")
    @classmethod
    def _not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be empty or only whitespace")
        if any(ord(c) < 32 for c in v):
            raise ValueError("must not contain control characters")
        return v

    @field_validator("image_path")
    @classmethod
    def _path_is_sane(cls, v: str | None) -> str | None:
        if v is not None and ("\x00" in v or not v.strip()):
            raise ValueError("must be a non-empty path without NUL characters")
        return v

    @field_validator("image_b64")
    @classmethod
    def _b64_decodes(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v is None:
            return v
        try:
            data = base64.b64decode(v, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ValueError(f"not valid base64 ({exc})") from exc
        if not data:
            raise ValueError("decodes to 0 bytes")
        s = _settings_from(info)
        if s is not None and len(data) > s.max_inline_bytes:
            raise ValueError(_inline_too_big(len(data), s.max_inline_bytes))
        return v

    @field_validator("captured_at")
    @classmethod
    def _aware(cls, v: datetime) -> datetime:
        if v.tzinfo is None or v.tzinfo.utcoffset(v) is None:
            raise ValueError(
                f"captured_at must be timezone-aware, got naive {v.isoformat()} "
                "(use e.g. datetime.now(timezone.utc) or an ISO string with an offset)"
            )
        return v

    @model_validator(mode="after")
    def _one_image(self) -> InspectionMessage:
        if (self.image_path is None) == (self.image_b64 is None):
            which = "both" if self.image_path is not None else "neither"
            raise PydanticCustomError(
                "one_image",
                "give exactly one of image_path and image_b64 (got {which})",
                {"which": which},
            )
        if self.image_b64 is not None and self.image_sha256 is not None:
            actual = hashlib.sha256(self.image_bytes()).hexdigest()
            if actual != self.image_sha256:
                raise PydanticCustomError(
                    "sha256_mismatch",
                    "image_sha256 {given} does not match the inline bytes ({actual})",
                    {"given": self.image_sha256, "actual": actual},
                )
        return self

    # --- helpers --------------------------------------------------------------------------------
    def validate_limits(self, settings: Settings) -> InspectionMessage:
        """Check the deployment limits of ``settings``; returns ``self``.

        Raises:
            MessageError: the inline image decodes to more than ``settings.max_inline_bytes``.
        """
        if self.image_b64 is not None:
            n = _decoded_len(self.image_b64)
            if n > settings.max_inline_bytes:
                raise MessageError(
                    [("image_b64", _inline_too_big(n, settings.max_inline_bytes))],
                    inspection_id=self.inspection_id,
                )
        return self

    def image_bytes(self, roots: list[Path] | None = None) -> bytes:
        """The encoded image bytes.

        Inline images are decoded from ``image_b64``. For ``image_path`` the file is read after
        confining it to ``roots`` (symlinks resolved; see
        :func:`worker.model.preprocess.resolve_under_roots`).

        Raises:
            MessageError: the message has an ``image_path`` and no ``roots`` were given.
            worker.model.preprocess.ImageError: the path lies outside ``roots`` or cannot be read.
        """
        if self.image_b64 is not None:
            return base64.b64decode(self.image_b64, validate=True)
        if roots is None:
            raise MessageError(
                [("image_path", "reading a path needs the image roots (pass roots=...)")],
                inspection_id=self.inspection_id,
            )
        from worker.model.images import ImageError, resolve_under_roots

        path = resolve_under_roots(self.image_path or "", roots)
        try:
            return path.read_bytes()
        except OSError as exc:
            raise ImageError(f"cannot read image file {path}: {exc}") from exc

    def to_json_dict(self) -> dict[str, Any]:
        """The JSON-safe dict that goes on the wire (``captured_at`` as ISO 8601 with offset)."""
        return self.model_dump(mode="json")


def _decoded_len(b64: str) -> int:
    """Decoded size in bytes of a valid (padded) base64 string, without decoding it."""
    n = len(b64)
    return n * 3 // 4 - b64[-2:].count("=")


def _inline_too_big(n: int, limit: int) -> str:
    return (
        f"inline image is {n} bytes, over the limit of {limit} "
        "(INSPECTION_AUDIT_MAX_INLINE_BYTES); send a path under an image root instead"
    )


def parse_message(payload: Any, settings: Settings | None = None) -> InspectionMessage:
    """Validate a received payload (a dict from JSON) into an :class:`InspectionMessage`.

    ``settings`` (default: none) adds the deployment limits (``max_inline_bytes``).

    Raises:
        MessageError: the payload is not a JSON object, has an unknown ``schema_version``
            (``"unsupported schema_version 2; this worker reads 1"``), an unknown or missing
            field, or a field that is out of range; the message names each field and reason.
    """
    if not isinstance(payload, Mapping):
        raise MessageError([("", f"message must be a JSON object, got {type(payload).__name__}")])
    raw_id = payload.get("inspection_id")
    iid = raw_id if isinstance(raw_id, str) and len(raw_id) <= 128 else None
    version = payload.get("schema_version", SCHEMA_VERSION)
    if version != SCHEMA_VERSION or isinstance(version, bool):
        raise MessageError(
            [
                (
                    "schema_version",
                    f"unsupported schema_version {version!r}; this worker reads {SCHEMA_VERSION}",
                )
            ],
            inspection_id=iid,
        )
    context = {"settings": settings} if settings is not None else None
    try:
        return InspectionMessage.model_validate(dict(payload), context=context)
    except ValidationError as exc:
        raise MessageError.from_validation_error(exc, inspection_id=iid) from None
