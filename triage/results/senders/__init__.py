"""Deliver result files to a destination: C-STORE (``dimse``) or STOW-RS (``stow``).

``send_files`` picks the sender registered for the destination's type. It delivers every file
or raises DestinationUnavailableError (retry later) or PermanentError (do not retry).
"""

from __future__ import annotations

from triage.results.senders import dimse, stow
from triage.results.senders.base import ResultFile, send_files

__all__ = ["ResultFile", "dimse", "send_files", "stow"]
