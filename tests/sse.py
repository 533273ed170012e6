"""A small Server-Sent Events client over treq's stream, following the WHATWG parsing
rules (fields, comments, multi-line data, ``retry``), for tests against a real master."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred


@dataclass
class Event:
    id: str | None
    name: str
    data: str

    @property
    def json(self) -> Any:
        return json.loads(self.data)


@dataclass
class EventStream:
    url: str
    key: str | None
    events: list[Event] = field(default_factory=list)
    retry: int | None = None
    comments: int = 0
    headers: Any = None
    code: int = 0
    _buffer: str = ""
    _pending: dict[str, Any] = field(default_factory=dict)
    _waiters: list[tuple[Any, Deferred]] = field(default_factory=list)

    async def open(self, last_id: str | None = None) -> EventStream:
        headers = {"Accept": ["text/event-stream"], "Cache-Control": ["no-cache"]}
        if self.key is not None:
            headers["X-API-Key"] = [self.key]
        if last_id is not None:
            headers["Last-Event-ID"] = [last_id]
        response = await treq.get(self.url, headers=headers, unbuffered=True, persistent=False,
                                  timeout=20)
        self.code, self.headers = response.code, response.headers
        self.ended = treq.collect(response, self._feed) if response.code == 200 else None
        return self

    def _feed(self, data: bytes) -> None:
        self._buffer += data.decode()
        while "\n" in self._buffer:
            line, self._buffer = self._buffer.split("\n", 1)
            self._line(line.removesuffix("\r"))
        for waiter in list(self._waiters):
            matches, d = waiter
            found = [e for e in self.events if matches(e)]
            if found:
                self._waiters.remove(waiter)
                d.callback(found[0])

    def _line(self, line: str) -> None:
        if not line:  # dispatch
            pending, self._pending = self._pending, {}
            if "data" in pending:
                self.events.append(Event(pending.get("id"), pending.get("event", "message"),
                                         "\n".join(pending["data"])))
            return
        if line.startswith(":"):
            self.comments += 1
            return
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            self._pending.setdefault("data", []).append(value)
        elif name == "retry" and value.isdigit():
            self.retry = int(value)
        elif name in ("id", "event"):
            self._pending[name] = value

    def wait(self, matches: Any, timeout: float = 20) -> Deferred:
        """The first event for which ``matches(event)`` is true, now or when it comes."""
        d: Deferred = Deferred()
        self._waiters.append((matches, d))
        self._feed(b"")
        return d.addTimeout(timeout, reactor)

    def of_type(self, kind: str) -> list[dict[str, Any]]:
        """NodePass-dialect events of one ``type``, as their JSON data."""
        return [e.json for e in self.events if e.json.get("type") == kind]
