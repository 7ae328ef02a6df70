"""Association policy: which calling AE titles may associate, optionally from which hosts."""

from __future__ import annotations

import ipaddress
import socket

from triage.config import AllowedCaller


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

    def __init__(self, callers: list[AllowedCaller]) -> None:
        self._any_host = {c.ae_title for c in callers if c.host is None}
        self._pinned = [(c.ae_title, _addresses(c.host)) for c in callers if c.host is not None]
        self.open = not callers

    def titles_for(self, address: str) -> set[str]:
        """The calling AE titles accepted from ``address``."""
        titles = set(self._any_host)
        titles.update(title for title, hosts in self._pinned if address in hosts)
        return titles
