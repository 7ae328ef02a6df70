"""Pulling studies from archives that cannot push (``poller``)."""
