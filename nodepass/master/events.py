"""Server-Sent Events: the master's live feed (``GET /v1/events`` in each dialect).

Events: ``initial`` (every instance, on connect), ``create``, ``update``,
``delete``, ``log`` (instance log lines), ``shutdown``.  Each has an id; the hub
keeps the last ``HISTORY`` events so a browser reconnecting with
``Last-Event-ID`` gets what it missed (or a fresh ``initial`` if too much was
missed).  A subscriber whose connection stops draining is dropped once more than
MAX_BEHIND bytes waited for it: a burst passes (a tick's update for each of 500
instances is ~300 KB, more than a transport's buffer before it pauses us), a reader
that stopped goes, and what waits for one is bounded.
How an event is written (names, fields) is each API dialect's: see ``encode``
for the seed's and ``npview`` for NodePass's.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer
from twisted.internet.task import LoopingCall
from zope.interface import implementer

from nodepass import logs

HISTORY = 1000
KEEPALIVE = 15.0
MAX_BEHIND = 4 << 20  # bytes written to a paused subscriber before it is dropped


def encode(event_id: int, kind: str, data: Any) -> bytes:
    body = json.dumps(data, separators=(",", ":"))
    return f"id: {event_id}\nevent: {kind}\ndata: {body}\n\n".encode()


@implementer(IPushProducer)
class Subscriber:
    """One open ``/v1/events`` response."""

    def __init__(self, request: Any, dialect: str,
                 on_gone: Callable[[Subscriber], None]) -> None:
        self.request = request
        self.dialect = dialect
        self.on_gone = on_gone
        self.backed_up = False
        self.behind = 0  # bytes written since its transport paused us
        self.closed = False
        self.finished: Deferred[None] = Deferred()  # what the route returns: open until closed
        request.registerProducer(self, True)
        request.notifyFinish().addBoth(lambda _: self._gone())

    # The response's transport calls these as its buffer fills and drains.
    def pauseProducing(self) -> None:
        self.backed_up = True

    def resumeProducing(self) -> None:
        self.backed_up = False
        self.behind = 0

    def stopProducing(self) -> None:
        self._gone()

    def send(self, chunk: bytes) -> None:
        if self.closed:
            return
        if self.backed_up:
            self.behind += len(chunk)
            if self.behind > MAX_BEHIND:
                logs.logger("nodepass.master").info("dropping an event subscriber that "
                                                    "stopped reading")
                self.close()
                return
        self.request.write(chunk)

    def close(self) -> None:
        if self.closed:
            return
        self._gone()
        self.request.unregisterProducer()
        if not self.finished.called:
            self.finished.callback(None)  # Klein finishes the response

    def _gone(self) -> None:
        self.closed = True
        self.on_gone(self)


Renderer = Callable[[int, str, Any, Mapping[str, Any]], bytes]


class EventHub:
    """One stream of events, told in each API dialect's words.

    The registry publishes ``(kind, instance, fields)``; every dialect's renderer turns
    it into that dialect's SSE chunk at once (so a later change to the instance cannot
    leak into an older event), and the chunks are kept for resuming subscribers.
    """

    def __init__(self, clock: Any, keepalive: float = KEEPALIVE) -> None:
        self.clock = clock
        self.next_id = 1
        self.history: deque[tuple[int, dict[str, bytes]]] = deque(maxlen=HISTORY)
        self.subscribers: set[Subscriber] = set()
        self.renderers: dict[str, Renderer] = {}
        self._keepalive = LoopingCall(self._ping)
        self._keepalive.clock = clock
        self._interval = keepalive

    def add_dialect(self, name: str, render: Renderer) -> None:
        self.renderers[name] = render

    def start(self) -> None:
        self._keepalive.start(self._interval, now=False)

    def stop(self) -> None:
        if self._keepalive.running:
            self._keepalive.stop()

    def publish(self, kind: str, subject: Any = None, **fields: Any) -> int:
        event_id = self.next_id
        self.next_id += 1
        chunks = {name: render(event_id, kind, subject, fields)
                  for name, render in self.renderers.items()}
        self.history.append((event_id, chunks))
        for subscriber in list(self.subscribers):
            subscriber.send(chunks[subscriber.dialect])
        return event_id

    def missed_since(self, dialect: str, last_id: int) -> list[bytes] | None:
        """The events after ``last_id``, or None when they are no longer all kept."""
        if last_id >= self.next_id - 1:
            return []
        if not self.history or self.history[0][0] > last_id + 1:
            return None
        return [chunks[dialect] for event_id, chunks in self.history if event_id > last_id]

    def subscribe(self, request: Any, dialect: str, last_id: int | None,
                  snapshot: Callable[[int], list[bytes]], opening: bytes = b"") -> Subscriber:
        """Add a subscriber: ``opening`` first, then what it missed since ``last_id``, or
        (position unknown or lost) ``snapshot(id of the last event)``."""
        subscriber = Subscriber(request, dialect, self.subscribers.discard)
        self.subscribers.add(subscriber)
        if opening:
            subscriber.send(opening)
        missed = self.missed_since(dialect, last_id) if last_id is not None else None
        for chunk in snapshot(self.next_id - 1) if missed is None else missed:
            subscriber.send(chunk)
        return subscriber

    def _ping(self) -> None:
        for subscriber in list(self.subscribers):
            subscriber.send(b": keep-alive\n\n")

    def close_all(self) -> None:
        for subscriber in list(self.subscribers):
            subscriber.close()
