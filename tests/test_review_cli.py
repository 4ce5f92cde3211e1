"""``inspection-audit review`` in a terminal: the id is never cut (80 columns, or a pipe), the
queue's total is beside the rows, and a folder without a database is left as it was."""

from __future__ import annotations

import io
import os
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import pytest
from click.testing import CliRunner
from rich.console import Console

from inspection_audit.cli import main
from inspection_audit.cli.review import _print_table
from inspection_audit.settings import Settings, default_home, get_settings
from tests.support.workers import cli_command, worker_env

LONG_ID = "LINE3-STATION2-2026-11-29T08:15:02.123-000123456789"


def _row(n: int) -> dict[str, object]:
    return {
        "inspection_id": f"{LONG_ID}-{n}",
        "decision_score": 0.41234 - n / 100,
        "tau": 0.12,
        "p_defect": 0.07,
        "line": "line-3",
        "station": "st-2",
        "captured_at": datetime(2026, 11, 29, 8, 15, 2, tzinfo=UTC),
        "method": "iou_gap_adv",
        "model_version": "resnet18-0a1b2c3d4e5f",
        "iou_gap": 0.1,
        "iou_gap_adv": 0.41,
        "overlay_path": "/srv/results/overlays/resnet18-0a1b2c3d4e5f/iou_gap_adv/x/composite.png",
    }


@pytest.mark.parametrize("terminal", [True, False], ids=["80-column-terminal", "pipe"])
def test_ids_are_never_cut_and_the_total_is_shown(terminal: bool) -> None:
    buf = io.StringIO()
    console = Console(file=buf, force_terminal=terminal, width=80, color_system=None)
    _print_table([_row(n) for n in range(3)], 1234, console)
    text = buf.getvalue()
    for n in range(3):
        assert f"{LONG_ID}-{n}" in text
    assert "review queue: 3 of 1234 waiting" in text
    lines = text.splitlines()
    if terminal:
        assert max(len(line) for line in lines) <= 80
        assert "left out to fit 80 columns" in text
    else:
        assert "composite.png" in text and "iou_gap_adv@resnet18-0a1b2c3d4e5f" in text


def test_review_piped_through_the_cli(tmp_path: Path) -> None:
    from db.migrate import upgrade
    from db.repository import upsert_audit, upsert_inspection
    from db.rows import AuditRow, InspectionRow
    from db.session import dispose_engines, session_scope

    url = f"sqlite:///{tmp_path / 'a.sqlite3'}"
    upgrade(url)
    with session_scope(url) as s:
        for n in range(5):
            iid = f"{LONG_ID}-{n}"
            upsert_inspection(
                s, InspectionRow(iid, "x.png", "l", "s", datetime.now(UTC), "ok", 0.1)
            )
            upsert_audit(
                s,
                AuditRow(
                    iid,
                    "v",
                    "iou_gap_adv",
                    "done",
                    decision_score=0.5 + n / 10,
                    tau=0.1,
                    suspected_false_negative=True,
                ),
            )
    dispose_engines(url)
    out = subprocess.run(
        [*cli_command("review", "--limit", "2")],
        env={**worker_env({"database_url": url, "home": tmp_path / "home"}), "COLUMNS": "80"},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert "review queue: 2 of 5 waiting" in out.stdout
    assert f"{LONG_ID}-4" in out.stdout and f"{LONG_ID}-3" in out.stdout


def test_review_elsewhere_leaves_no_stray_folder(tmp_path: Path) -> None:
    home = tmp_path / "home"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = subprocess.run(
        cli_command("review"),
        env=worker_env({"home": home}),
        cwd=elsewhere,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode != 0
    assert "no database at" in out.stderr and "inspection-audit demo" in out.stderr
    assert list(elsewhere.iterdir()) == []
    assert not home.exists()


def test_the_default_home_is_a_fixed_per_user_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("INSPECTION_AUDIT_HOME", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    monkeypatch.chdir(tmp_path)
    assert default_home() == tmp_path / "xdg" / "inspection-audit"
    assert Settings().home == tmp_path / "xdg" / "inspection-audit"
    monkeypatch.delenv("XDG_DATA_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    assert Settings().home == tmp_path / "user" / ".local" / "share" / "inspection-audit"
    monkeypatch.setenv("XDG_DATA_HOME", "relative/ignored")  # the spec says: absolute only
    assert Settings().home == tmp_path / "user" / ".local" / "share" / "inspection-audit"
    assert os.listdir(tmp_path) == []  # settings create no folder


def test_web_accounts_commands(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from inspection_audit.web.auth import load_accounts, verify_password

    monkeypatch.setenv("INSPECTION_AUDIT_HOME", str(tmp_path / "home"))
    get_settings.cache_clear()
    try:
        runner = CliRunner()
        r = runner.invoke(main, ["web", "add-user", "ann", "--password", "s3cret"])
        assert r.exit_code == 0, r.output
        r = runner.invoke(main, ["web", "add-user", "ann", "--password", "again"])
        assert r.exit_code != 0 and "already" in r.output
        r = runner.invoke(main, ["web", "add-token", "plc-gateway"])
        assert r.exit_code == 0, r.output
        token = r.output.strip().splitlines()[-1]
        h = runner.invoke(main, ["web", "hash-password", "--password", "pw"]).output.strip()
        assert h.startswith("scrypt$") and verify_password("pw", h)
        accounts = load_accounts(get_settings())
        assert accounts.check_password("ann", "s3cret") and not accounts.check_password("ann", "x")
        assert accounts.token_owner(token) == "plc-gateway" and accounts.token_owner("x") is None
        assert oct((tmp_path / "home" / "web-users").stat().st_mode & 0o777) == "0o600"
        assert "s3cret" not in (tmp_path / "home" / "web-users").read_text()
        assert token not in (tmp_path / "home" / "api-tokens").read_text()
        # serve refuses to start on a database that is not migrated
        r = runner.invoke(main, ["serve"])
        assert r.exit_code != 0 and "inspection-audit db upgrade" in r.output
        # and with nobody to log in
        monkeypatch.setenv("INSPECTION_AUDIT_HOME", str(tmp_path / "empty"))
        get_settings.cache_clear()
        r = runner.invoke(main, ["serve"])
        assert r.exit_code != 0 and "web add-user" in r.output
    finally:
        get_settings.cache_clear()


def test_review_shows_the_recall_promise_beside_tau(migrated_sqlite_url: str) -> None:
    """The τ line names how many misses it was set on and the recall it can promise."""
    from db.repository import upsert_audit, upsert_inspection
    from db.rows import AuditRow, InspectionRow
    from db.session import session_scope

    with session_scope(migrated_sqlite_url) as s:
        upsert_inspection(s, InspectionRow("P-1", "p.png", "l", "s", datetime.now(UTC), "ok", 0.1))
        promise = {
            "n_false_negatives": 8,
            "caught": 8,
            "recall_lower_bound": 0.05 ** (1 / 8),
            "split": "val",
        }
        upsert_audit(
            s,
            AuditRow(
                "P-1",
                "v1",
                "ensemble_mean",
                "done",
                p_defect=0.1,
                decision_score=0.4,
                tau=0.3,
                suspected_false_negative=True,
                params={"recall_promise": promise},
            ),
        )
    result = CliRunner().invoke(main, ["review", "--url", migrated_sqlite_url])
    assert result.exit_code == 0, result.output
    assert "ensemble_mean@v1: τ 0.3000 set on 8 missed defects of val promises recall ≥ 68.8 %" in (
        result.output
    )
