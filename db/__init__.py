"""db: the audit database (SQLAlchemy 2 models, sessions, Alembic migrations, queries).

* :mod:`db.models`: ``Inspection``, ``Audit``, ``Review`` and the ``review_queue`` view.
* :mod:`db.session`: ``make_engine(url)``, ``session_scope(url)``, ``dispose_engines()``.
* :mod:`db.migrate`: ``upgrade(url)``, ``downgrade(url, rev)``, ``current(url)``.
* :mod:`db.repository`: ``upsert_inspection``, ``upsert_audit``, ``review_queue``,
  ``record_verdict``, ``audit_summary``.

Importing :mod:`db` imports nothing heavy; import the submodules you need.
"""
