"""Logging set-up: one line per event, context from ``extra=`` appended as key=value.

Callers log UIDs, AE titles and counts, never patient data.
"""

from __future__ import annotations

import logging
import sys

_STANDARD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "taskName",
}


class ContextFormatter(logging.Formatter):
    """Appends the record's ``extra`` fields, sorted, after the message."""

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        context = {k: v for k, v in vars(record).items() if k not in _STANDARD_ATTRS}
        if context:
            line += " " + " ".join(f"{k}={v}" for k, v in sorted(context.items()))
        return line


def configure_logging(level: str) -> None:
    """Send triage's records to stderr at ``level``; third-party chatter stays at WARNING."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(ContextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    for name in ("triage", "workers"):
        logging.getLogger(name).setLevel(level)
