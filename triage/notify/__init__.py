"""Outward notifications of critical findings: a signed JSON webhook and an HL7 v2 ORU^R01 over
MLLP, each a channel module registered with ``@channel``; the ``Notifier`` sends what is owed.

Use: ``Notifier(settings, session_factory).run(stopping)`` in a thread of ``triage serve``, or
``send_due(now)`` for one pass.
"""

from __future__ import annotations

# Importing a channel module registers it.
from triage.notify import hl7, webhook
from triage.notify.notifier import Notifier, Outgoing, channel, owe, registered_channels

__all__ = ["Notifier", "Outgoing", "channel", "hl7", "owe", "registered_channels", "webhook"]
