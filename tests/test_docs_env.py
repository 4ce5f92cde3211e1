"""`.env.example` lists every ``INSPECTION_AUDIT_*`` variable the README documents, and each of
them is a real setting."""

from __future__ import annotations

import re
from pathlib import Path

from inspection_audit.settings import Settings

ROOT = Path(__file__).resolve().parents[1]


def _documented() -> set[str]:
    """Names in the README, with the table's shorthand (`` `_MAX_INLINE_BYTES` `` after a full
    name in the same row) expanded."""
    names: set[str] = set()
    for line in (ROOT / "README.md").read_text().splitlines():
        full = re.findall(r"INSPECTION_AUDIT_[A-Z0-9_]+", line)
        names.update(n.rstrip("_") for n in full)
        if full and line.startswith("|"):
            first_cell = line.split("|")[1]
            names.update(
                "INSPECTION_AUDIT_" + s for s in re.findall(r"`_([A-Z0-9_]+)`", first_cell)
            )
    return names


def test_env_example_lists_the_documented_variables() -> None:
    documented = _documented()
    assert (
        "INSPECTION_AUDIT_WEB_USERS" in documented
        and "INSPECTION_AUDIT_MAX_INLINE_BYTES" in documented
    )
    listed = set(re.findall(r"INSPECTION_AUDIT_[A-Z0-9_]+", (ROOT / ".env.example").read_text()))
    missing = sorted(documented - listed)
    assert missing == [], f".env.example lacks {missing}"
    fields = {f"INSPECTION_AUDIT_{name.upper()}" for name in Settings.model_fields}
    assert sorted(documented - fields) == []
