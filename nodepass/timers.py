"""Delayed calls that may already have run, or been cancelled, by the time they are dropped."""

from __future__ import annotations

from twisted.internet.interfaces import IDelayedCall


def cancelled(call: IDelayedCall | None) -> None:
    """Cancel ``call`` if it is still pending; returns ``None``, to store in its place."""
    if call is not None and call.active():
        call.cancel()
    return None
