"""Benchmarks of inspection-audit (not part of the installed package; run from the repo root).

* :mod:`bench.throughput`: images/s of inference, the audit (with and without FGSM), the
  ``pytorch_grad_cam`` equivalent, and end to end through Redis, Celery and PostgreSQL.
  ``python -m bench.throughput --help``; see ``bench/README.md``.
* :mod:`bench.web`: the review station with 100,000 audit rows in PostgreSQL (queue page,
  ``/metrics`` and other pages' latency; HTTP ingest into Redis). ``python -m bench.web --help``.
"""
