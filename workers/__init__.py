"""Celery workers: inference and result dispatch. Imports triage, never the reverse."""
