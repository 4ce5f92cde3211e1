"""The offline lab: dataset reading, training, calibration runs, evaluation, sweeps, reports.

The service (``worker/``, ``producer/``, ``db/``) never imports this package."""
