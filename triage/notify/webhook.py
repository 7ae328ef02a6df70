"""The webhook channel: one signed JSON POST per notification to ``webhook_url``.

Body: the notification's payload (study UID, accession number, model, finding, probability,
volume, tier, reason, round; never the patient's name or ID) plus ``event: "critical_finding"``,
``notification_id`` and ``timestamp`` (ISO 8601, UTC, when this attempt was made). Headers:
``X-Triage-Delivery: <notification id>`` (the same on every retry: receivers deduplicate on it)
and, when ``webhook_secret`` is set, ``X-Triage-Signature: sha256=<hex HMAC-SHA256 of the exact
body bytes>``.

Answers: 2xx is sent; a connection error, a timeout, 408, 429 or 5xx is retried; any other
status (other 4xx, and 3xx: redirects are not followed, a POST would lose its body) fails.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import Any

import httpx

from triage import __version__
from triage.config import Settings
from triage.errors import DestinationUnavailableError, PermanentError
from triage.notify.notifier import Outgoing, channel

EVENT = "critical_finding"
ESCALATION_EVENT = "critical_finding_unacknowledged"
SIGNATURE_HEADER = "X-Triage-Signature"
DELIVERY_HEADER = "X-Triage-Delivery"
RETRYABLE_STATUSES = frozenset({408, 429})


def webhook_body(message: Outgoing, event: str = EVENT) -> bytes:
    """The exact bytes that are sent and signed: compact JSON with sorted keys."""
    body: dict[str, Any] = {
        **message.payload,
        "event": event,
        "notification_id": message.notification_id,
        "timestamp": message.attempted_at.isoformat(),
    }
    return json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def signature(secret: str, body: bytes) -> str:
    """``sha256=<hex>``: the HMAC-SHA256 of ``body`` keyed with ``secret``."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


@channel("webhook", destination=lambda settings: settings.webhook_url)
def send_webhook(settings: Settings, message: Outgoing, *, timeout: float) -> None:
    post(settings, settings.webhook_url, webhook_body(message), message, timeout=timeout)


@channel(
    "escalation-webhook",
    destination=lambda settings: settings.escalation_webhook_url,
    escalation=True,
)
def send_escalation(settings: Settings, message: Outgoing, *, timeout: float) -> None:
    """A critical alert nobody acknowledged in time: ``event`` is
    ``critical_finding_unacknowledged``, with ``escalated: true``."""
    body = webhook_body(message, ESCALATION_EVENT)
    post(settings, settings.escalation_webhook_url, body, message, timeout=timeout)


def post(settings: Settings, url: str, body: bytes, message: Outgoing, *, timeout: float) -> None:
    """POST ``body``, signed, to ``url``; raise as the module doc says."""
    headers = {
        "Content-Type": "application/json",
        "User-Agent": f"triage/{__version__}",
        DELIVERY_HEADER: str(message.notification_id),
    }
    if settings.webhook_secret is not None:
        headers[SIGNATURE_HEADER] = signature(settings.webhook_secret.get_secret_value(), body)
    try:
        response = httpx.post(
            url,
            content=body,
            headers=headers,
            timeout=timeout,
            follow_redirects=False,
        )
    except (httpx.InvalidURL, httpx.UnsupportedProtocol) as exc:
        raise PermanentError(f"webhook_url cannot be used: {exc}") from exc
    except httpx.TimeoutException as exc:
        raise DestinationUnavailableError(f"webhook timed out after {timeout:g} s") from exc
    except httpx.TransportError as exc:
        raise DestinationUnavailableError(f"webhook unreachable: {exc!r}") from exc
    status = response.status_code
    if response.is_success:
        return
    described = f"webhook answered HTTP {status} {response.reason_phrase}".rstrip()
    if status >= 500 or status in RETRYABLE_STATUSES:
        raise DestinationUnavailableError(described)
    raise PermanentError(described)
