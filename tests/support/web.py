"""Helpers for the review station's tests: settings with accounts, a database filled with audit
rows and real review maps (written by worker/model/overlay.py), logging in.

Plain functions, no fixtures: each test says what it fills.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from pydantic import SecretStr

from db.rows import AuditRow, InspectionRow
from inspection_audit.settings import Settings
from inspection_audit.web.auth import hash_password, hash_token

USER = "ann"
PASSWORD = "correct horse battery staple"
OTHER_USER = "bob"
TOKEN = "test-token-0123456789abcdefghijklmnopqrstuvwxyz"
VERSION = "resnet18-test0000001"
METHOD = "iou_gap_adv"
TAU = 0.1


def web_settings(base: Settings, tmp_path: Path, url: str, **extra: Any) -> Settings:
    """``base`` with the database ``url``, one reviewer (:data:`USER`), one API token
    (:data:`TOKEN` for client ``line``), image roots ``[tmp_path / "images"]``, results under
    ``tmp_path / "results"`` and a fixed session key."""
    images = tmp_path / "images"
    images.mkdir(parents=True, exist_ok=True)
    values: dict[str, Any] = {
        "database_url": url,
        "home": tmp_path / "home",
        "image_roots": [images],
        "results_dir": tmp_path / "results",
        "web_users": [
            f"{USER}:{hash_password(PASSWORD, n=2**10)}",
            f"{OTHER_USER}:{hash_password('other', n=2**10)}",
        ],
        "api_tokens": [f"line:{hash_token(TOKEN)}"],
        "web_secret": SecretStr("test-session-key-" + "x" * 20),
        **extra,
    }
    return base.model_copy(update=values)


def png_bytes(size: tuple[int, int] = (48, 64), seed: int = 0) -> bytes:
    """A small grayscale PNG (``size`` = height, width)."""
    import io

    rng = np.random.default_rng(seed)
    arr = (rng.uniform(0.3, 0.7, size) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr, mode="L").save(buf, format="PNG")
    return buf.getvalue()


def _part(n: int, size: tuple[int, int] = (170, 256)) -> tuple[np.ndarray, tuple[int, int]]:
    """A synthetic surface (``float64[h, w]`` in [0, 1]) with a dark blob defect, and where."""
    from tests.support.models import texture

    rng = np.random.default_rng(100 + n)
    h, w = size
    surface = texture(rng, max(h, w))[:h, :w]
    cy, cx = int(rng.integers(20, h - 20)), int(rng.integers(20, w - 20))
    yy, xx = np.mgrid[0:h, 0:w]
    blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * 6.0**2))
    return np.clip(surface - 0.3 * blob, 0, 1), (cy, cx)


def _blob(h: int, w: int, cy: float, cx: float, r: float) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    m = torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
    return m / m.max()


@dataclass
class Filled:
    """What :func:`fill` wrote: ids by kind, in insertion order."""

    flagged: list[str]
    unflagged: list[str]
    errors: list[str]

    @property
    def all(self) -> list[str]:
        return [*self.flagged, *self.unflagged, *self.errors]


def fill(
    settings: Settings,
    *,
    flagged: int = 6,
    unflagged: int = 3,
    errors: int = 2,
    lines: tuple[str, ...] = ("line-1", "line-2"),
    prefix: str = "INS",
    maps: bool = True,
    captured: datetime | None = None,
) -> Filled:
    """Write inspections and audit rows as a worker would: flagged ones (scores descending
    with their index, real review maps from :func:`worker.model.overlay.save_review_maps`,
    originals under the first image root), unflagged done rows and error rows. Lines alternate
    over ``lines``; stations ``st-1``/``st-2``."""
    from db.repository import upsert_audit, upsert_inspection
    from db.session import session_scope
    from worker.batch import result_folder
    from worker.model.overlay import save_review_maps

    root = settings.image_roots[0]
    captured = captured or datetime(2026, 11, 29, 8, 0, tzinfo=UTC)
    out = Filled([], [], [])
    n = 0
    with session_scope(settings.resolved_database_url) as session:
        for kind, count in (("flagged", flagged), ("unflagged", unflagged), ("error", errors)):
            for k in range(count):
                iid = f"{prefix}-{kind}-{k:04d}"
                rel = f"{kind}/{iid}.png"
                (root / rel).parent.mkdir(parents=True, exist_ok=True)
                part, (cy, cx) = _part(n)
                Image.fromarray((part * 255).astype(np.uint8), mode="L").save(root / rel)
                line = lines[n % len(lines)]
                upsert_inspection(
                    session,
                    InspectionRow(
                        inspection_id=iid,
                        image_ref=rel,
                        line=line,
                        station=f"st-{1 + n % 2}",
                        captured_at=captured + timedelta(minutes=n),
                        prediction="ok",
                        score=0.05,
                        expected_model_version=VERSION,
                    ),
                )
                if kind == "error":
                    row = AuditRow(
                        iid, VERSION, METHOD, status="error", error=f"cannot decode image {k % 2}"
                    )
                else:
                    score = (0.9 - 0.1 * k) if kind == "flagged" else (-0.2 - 0.01 * k)
                    row = AuditRow(
                        iid,
                        VERSION,
                        METHOD,
                        status="done",
                        p_defect=0.05 + 0.01 * k,
                        scores={"msp": 0.05 + 0.01 * k, "iou_gap": score / 2, METHOD: score},
                        details={"iou_ok": 0.1, "p_defect_adv": 0.2, "flipped": False},
                        decision_score=score,
                        tau=TAU,
                        suspected_false_negative=kind == "flagged",
                        params={"taus": {METHOD: TAU, "msp": 0.3, "iou_gap": 0.05}, "theta": 0.5},
                        worker_host="test:1",
                    )
                    if kind == "flagged" and maps:
                        h, w = part.shape
                        image = torch.from_numpy(part).float()[None]
                        saved = save_review_maps(
                            image,
                            {
                                "gradcam_defect": _blob(h, w, cy + 3, cx - 4, 10 + k % 3),
                                "gradcam_ok": _blob(h, w, h - cy, w - cx, 35),
                                "agnostic": _blob(h, w, cy, cx, 18),
                            },
                            result_folder(settings, VERSION, METHOD, iid),
                            method=METHOD,
                            caption=f"{iid}  {METHOD} {score:.3f} >= τ {TAU:.3f}",
                        )
                        row.overlay_path = str(saved.composite)
                        assert row.details is not None
                        row.details["maps"] = {k2: str(v) for k2, v in saved.maps.items()}
                        row.details["region_fraction"] = saved.region_fraction
                upsert_audit(session, row)
                {"flagged": out.flagged, "unflagged": out.unflagged, "error": out.errors}[
                    kind
                ].append(iid)
                n += 1
    return out


def csrf_of(html: str) -> str:
    """The CSRF token of the first form on a page."""
    m = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert m, "no CSRF token on the page"
    return m.group(1)


def login(client: Any, user: str = USER, password: str = PASSWORD) -> str:
    """Log ``client`` (FastAPI's TestClient) in; returns the session's CSRF token."""
    token = csrf_of(client.get("/login").text)
    r = client.post(
        "/login",
        data={"username": user, "password": password, "csrf_token": token, "next": "/queue"},
        follow_redirects=False,
    )
    assert r.status_code == 303, r.text
    return csrf_of(client.get("/queue").text)


def bearer() -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKEN}"}
