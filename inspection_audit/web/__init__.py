"""The review station: one FastAPI application for reviewers, line software and operators.

``create_app(settings)`` (:mod:`inspection_audit.web.app`) serves the review queue, the
inspection page, the overview, HTTP ingest (``POST /api/v1/inspections``), ``/metrics`` and
``/healthz`` on the same settings and database as the workers. It belongs to the service side:
it imports ``db``, ``producer``, ``worker`` and the settings, never the lab or the CLI.
"""

from inspection_audit.web.app import create_app

__all__ = ["create_app"]
