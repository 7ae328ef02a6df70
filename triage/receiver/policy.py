"""Association policy: which calling AE titles may associate, optionally from which hosts."""

from __future__ import annotations

import ipaddress
import socket
import threading

from pynetdicom import AE
from pynetdicom.association import Association

from triage.config import Caller

# No calling AE title equals this (titles are non-empty after stripping), so a caller pinned to
# other hosts is refused with "calling AE title not recognised".
_NOBODY = [""]


def _addresses(host: str) -> set[str]:
    try:
        return {str(ipaddress.ip_address(host))}
    except ValueError:
        try:
            return {str(info[4][0]) for info in socket.getaddrinfo(host, None)}
        except OSError:
            return set()


class CallerPolicy:
    """Allowed callers; an empty list allows any caller."""

    def __init__(self, callers: list[Caller]) -> None:
        self._any_host = {c.ae_title for c in callers if c.host is None}
        self._pinned = [(c.ae_title, _addresses(c.host)) for c in callers if c.host is not None]
        self.open = not callers

    def titles_for(self, address: str) -> list[str]:
        """The calling AE titles accepted from ``address``."""
        titles = set(self._any_host)
        titles.update(title for title, hosts in self._pinned if address in hosts)
        return sorted(titles) or _NOBODY


class TriageAE(AE):
    """pynetdicom's AE with the calling-AE check made per peer address.

    pynetdicom reads ``require_calling_aet`` during negotiation in the association's own
    thread, so the peer's address is known there.
    """

    def __init__(self, ae_title: str, policy: CallerPolicy) -> None:
        super().__init__(ae_title=ae_title)
        self.caller_policy = policy

    @property
    def require_calling_aet(self) -> list[str]:
        if self.caller_policy.open:
            return []
        current = threading.current_thread()
        if not isinstance(current, Association):
            return _NOBODY
        return self.caller_policy.titles_for(str(current.requestor.address))

    @require_calling_aet.setter
    def require_calling_aet(self, ae_titles: list[str]) -> None:
        raise AttributeError("set allowed_callers in the settings instead")
