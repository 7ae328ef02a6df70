"""Command lines: ``triage`` (the daemon and the worker) and ``triage-admin``."""
