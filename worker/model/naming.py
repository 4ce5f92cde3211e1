"""Names shared by the worker's review maps and the review station (no torch import).

:func:`map_title` says what a map of :class:`worker.measure.Measured` shows;
:func:`safe_name` turns an ``inspection_id`` into a file name.
"""

from __future__ import annotations

import re

#: Human titles of the maps the audit makes (worker.measure.Measured.maps).
MAP_TITLES = {
    "gradcam_defect": "Grad-CAM, class defect",
    "gradcam_ok": "Grad-CAM, class ok",
    "agnostic": "class-agnostic map (Eigen-CAM)",
}


def map_title(name: str) -> str:
    """The title of map ``name`` (``anomaly_<bank>`` → "anomaly distance, <bank> bank")."""
    if name in MAP_TITLES:
        return MAP_TITLES[name]
    if name.startswith("anomaly_"):
        return f"anomaly distance, {name.removeprefix('anomaly_')} bank"
    return name


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


def safe_name(text: str) -> str:
    """``text`` as a file name: anything but ``[A-Za-z0-9._-]`` becomes ``~XX`` per UTF-8 byte.

    Distinct texts give distinct names (``LINE3:ST2`` → ``LINE3~3aST2``, never the name of the
    valid id ``LINE3_ST2``), so two inspections never share a review-map folder or an exported
    image.
    """
    return _UNSAFE.sub(
        lambda m: "".join(f"~{b:02x}" for b in m.group().encode("utf-8", "surrogatepass")), text
    )
