"""A real browser against a real server: Debian's Chromium driven by Playwright's Python package
(``executable_path``, nothing downloads a browser), a uvicorn subprocess started here, on a
database this test fills with audit rows and review maps written by the worker's overlay code.

Log in; the queue shows its thumbnails; ``c`` confirms the top item, which leaves the queue, and
the verdict row names the reviewer; a line filter narrows the queue; the inspection page shows
every map; screenshots of the queue and of an inspection go to ``docs/img/``.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from db.models import Review
from db.session import dispose_engines, session_scope
from inspection_audit.procs import wait_for, worker_env
from inspection_audit.settings import Settings
from tests.support.web import PASSWORD, USER, fill, web_settings

pytestmark = [pytest.mark.browser, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
DOCS_IMG = ROOT / "docs" / "img"
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]


def chromium_path() -> str | None:
    """Debian's Chromium (``apt-get install chromium``; scripts/ensure-tools.sh does it)."""
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    return "/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def server(tmp_path: Path, migrated_sqlite_url: str) -> Iterator[tuple[str, Settings, Any]]:
    """A uvicorn subprocess serving the review station on a filled database."""
    s = web_settings(Settings(home=tmp_path / "home"), tmp_path, migrated_sqlite_url)
    filled = fill(s, flagged=9, unflagged=3, errors=2, prefix="PART-2026-11-29")
    port = _free_port()
    values = {
        "database_url": migrated_sqlite_url,
        "home": s.home,
        "image_roots": s.image_roots,
        "results_dir": s.resolved_results_dir,
        "web_users": ",".join(s.web_users),
        "api_tokens": ",".join(s.api_tokens),
        "web_secret": s.web_secret.get_secret_value() if s.web_secret else None,
    }
    env = worker_env(values)
    log = tmp_path / "server.log"
    with log.open("wb") as fh:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "inspection_audit.web.app:app_from_env",
                "--factory",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--log-level",
                "warning",
            ],
            env=env,
            cwd=tmp_path,
            stdout=fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    base = f"http://127.0.0.1:{port}"

    def up() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"server exited: {log.read_text()[-3000:]}")
        try:
            return httpx.get(f"{base}/healthz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        assert wait_for(up, timeout=60), log.read_text()[-3000:]
        yield base, s, filled
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        dispose_engines(migrated_sqlite_url)


def _images_loaded(page: Any, selector: str) -> list[int]:
    return page.eval_on_selector_all(
        selector, "els => els.map(e => e.complete ? e.naturalWidth : 0)"
    )


def test_review_in_a_real_browser(server: tuple[str, Settings, Any]) -> None:
    exe = chromium_path()
    if exe is None:
        pytest.skip(
            "Debian's chromium is not installed (apt-get install -y chromium; "
            "scripts/ensure-tools.sh installs it when run as root)"
        )
    from playwright.sync_api import sync_playwright

    base, settings, filled = server
    url = settings.resolved_database_url
    DOCS_IMG.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, args=CHROMIUM_FLAGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            # no credentials: the login form
            page.goto(f"{base}/queue")
            assert "/login" in page.url
            page.fill("input[name=username]", USER)
            page.fill("input[name=password]", PASSWORD)
            page.click("button[type=submit]")
            page.wait_for_url(f"{base}/queue")
            # the queue, most suspicious first, with its thumbnails
            ids = page.eval_on_selector_all("tr.item", "rs => rs.map(r => r.dataset.inspectionId)")
            assert ids == filled.flagged
            page.wait_for_function(
                "() => [...document.querySelectorAll('img.thumb')].every(i => i.complete && i.naturalWidth > 0)"
            )
            widths = _images_loaded(page, "img.thumb")
            assert len(widths) == len(filled.flagged) and all(w > 100 for w in widths)
            assert page.inner_text("h1").startswith("Review queue")
            assert "9 suspected false negatives waiting" in page.inner_text("h1")
            page.screenshot(path=str(DOCS_IMG / "review-queue.png"), full_page=False)
            # `c` confirms the selected (top) item: it leaves the queue
            top = ids[0]
            with page.expect_navigation():
                page.keyboard.press("c")
            after = page.eval_on_selector_all(
                "tr.item", "rs => rs.map(r => r.dataset.inspectionId)"
            )
            assert after == filled.flagged[1:]
            with session_scope(url) as s:
                rows = s.execute(
                    sa.select(Review.inspection_id, Review.verdict, Review.reviewer)
                ).all()
            assert [tuple(r) for r in rows] == [(top, "confirmed_defect", USER)]
            # j moves the selection, x clears the selected item
            page.keyboard.press("j")
            second = filled.flagged[2]
            with page.expect_navigation():
                page.keyboard.press("x")
            after = page.eval_on_selector_all(
                "tr.item", "rs => rs.map(r => r.dataset.inspectionId)"
            )
            assert second not in after and len(after) == len(filled.flagged) - 2
            # a line filter narrows the queue
            page.select_option("#filter-line", "line-2")
            with page.expect_navigation():
                page.click("#apply-filters")
            lines = page.eval_on_selector_all(
                "tr.item td:nth-child(6)", "cs => cs.map(c => c.innerText)"
            )
            assert lines and set(lines) == {"line-2"}
            assert len(lines) < len(after)
            # the inspection page shows every map (all loaded), scores with their τ
            with page.expect_navigation():
                page.click("tr.item a.open")
            maps = page.eval_on_selector_all("figure.map", "fs => fs.map(f => f.dataset.map)")
            assert maps == ["gradcam_defect", "gradcam_ok", "agnostic"]
            page.wait_for_function(
                "() => [...document.querySelectorAll('figure.map img')].every(i => i.complete && i.naturalWidth > 0)"
            )
            assert all(w > 200 for w in _images_loaded(page, "figure.map img"))
            assert "IoU gap r_adv after one adversarial step" in page.inner_text("table.scores")
            current = page.inner_text("h1")
            page.screenshot(path=str(DOCS_IMG / "review-inspection.png"), full_page=True)
            # a verdict with a note opens the next item of the (filtered) queue
            page.fill("#note", "scratch near the edge")
            with page.expect_navigation():
                page.click("#form-confirmed button")
            assert page.inner_text("h1") != current and "line=line-2" in page.url
            with session_scope(url) as s:
                note = s.execute(
                    sa.select(Review.note, Review.reviewer).where(Review.inspection_id == current)
                ).one()
            assert tuple(note) == ("scratch near the edge", USER)
        finally:
            browser.close()
    for name in ("review-queue.png", "review-inspection.png"):
        assert (DOCS_IMG / name).stat().st_size > 10_000
