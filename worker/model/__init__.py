"""The production model as files: checkpoint format, image reading, preprocessing, overlays.

Used by the worker and by the lab; imports neither Celery nor the lab."""
