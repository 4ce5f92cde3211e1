"""The producer: validate inspections and send them to the audit queue (JSON, never pickle).

>>> from producer import enqueue
>>> enqueue("L1-000123", "2024/06/01/000123.png", "ok", 0.031, line="L1", station="S3")

``import producer`` does not import torch. Checking an image *path* does, for now, because
it uses :func:`worker.model.preprocess.resolve_under_roots`.
"""

from producer.api import EnqueueError, enqueue, enqueue_many, get_app, prepare_message, reset_apps
from producer.outbox import OutboxError, Reconciled, reconcile
from producer.schema import SCHEMA_VERSION, InspectionMessage, MessageError, parse_message

__all__ = [
    "SCHEMA_VERSION",
    "EnqueueError",
    "InspectionMessage",
    "MessageError",
    "OutboxError",
    "Reconciled",
    "enqueue",
    "enqueue_many",
    "get_app",
    "parse_message",
    "prepare_message",
    "reconcile",
    "reset_apps",
]
