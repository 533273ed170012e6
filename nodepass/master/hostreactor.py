"""The reactor of a host process: many instances on one reactor, each in its own scope.

An instance's code runs only from the reactor: a timer it set, a descriptor it
watches, a result a thread hands back.  This reactor remembers, for each of those,
the scope (:class:`nodepass.logs.Scope`) that was current when it was set up, and
enters that scope again to run it — the way asyncio carries ``contextvars`` into
its callbacks.  So a log event knows its instance wherever it was emitted (the
loggers stay per class), and a host can find and end everything one instance left:
its descriptors and its timers (:meth:`ScopedReactor.end_scope`).
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable
from typing import Any

from twisted.internet.base import DelayedCall
from twisted.internet.epollreactor import EPollReactor
from twisted.internet.error import ConnectionAborted
from twisted.python.threadpool import ThreadPool

from nodepass.logs import Scope, current_scope

SCOPE = "nodepass_scope"  # the attribute a descriptor carries its scope in


class _ScopedThreadPool(ThreadPool):
    """A thread's work and the result it hands back run in the caller's scope (a
    host name resolved for an instance answers to that instance)."""

    def callInThreadWithCallback(self, onResult: Any, func: Any, *args: Any,
                                 **kw: Any) -> None:
        caller = contextvars.copy_context()
        hand_back = None if onResult is None else (
            lambda ok, result: caller.run(onResult, ok, result))
        super().callInThreadWithCallback(hand_back, _run_in_copy, caller, func, *args, **kw)


def _run_in_copy(context: contextvars.Context, func: Any, *args: Any, **kw: Any) -> Any:
    return context.copy().run(func, *args, **kw)


class ScopedReactor(EPollReactor):
    """An epoll reactor that runs each timer, descriptor and thread result in the scope
    it was set up in (none: the host's own)."""

    def callLater(self, delay: float, f: Callable[..., Any], *args: Any,
                  **kw: Any) -> DelayedCall:
        scope = current_scope.get()
        if scope is None:
            return super().callLater(delay, f, *args, **kw)
        return super().callLater(delay, scope.run, f, *args, **kw)

    def callFromThread(self, f: Callable[..., Any], *args: Any, **kw: Any) -> None:
        scope = current_scope.get()
        if scope is None:
            super().callFromThread(f, *args, **kw)
        else:
            super().callFromThread(scope.run, f, *args, **kw)

    def addReader(self, reader: Any) -> None:
        _claim(reader)
        super().addReader(reader)

    def addWriter(self, writer: Any) -> None:
        _claim(writer)
        super().addWriter(writer)

    def _doReadOrWrite(self, selectable: Any, fd: int, event: int) -> None:
        scope = getattr(selectable, SCOPE, None)
        if scope is None:
            super()._doReadOrWrite(selectable, fd, event)
        elif scope.ended:
            self._disconnectSelectable(selectable, ConnectionAborted(), False)
        else:
            scope.run(super()._doReadOrWrite, selectable, fd, event)

    def _initThreadPool(self) -> None:
        self.threadpool = _ScopedThreadPool(0, 10, "twisted.internet.reactor")
        self._threadpoolStartupID = self.callWhenRunning(self.threadpool.start)
        self.threadpoolShutdownID = self.addSystemEventTrigger(
            "during", "shutdown", self._stopThreadPool)

    # -- ending one instance's everything ------------------------------------

    def descriptors_of(self, scope: Scope) -> list[Any]:
        return [s for s in self._selectables.values() if getattr(s, SCOPE, None) is scope]

    def timers_of(self, scope: Scope) -> list[DelayedCall]:
        return [c for c in self.getDelayedCalls()
                if c.active() and getattr(c.func, "__self__", None) is scope]

    def close_descriptors(self, scope: Scope) -> int:
        """Close every descriptor ``scope`` watches (its listeners, connections, status
        channel) now, as aborted connections; how many there were."""
        left = self.descriptors_of(scope)
        for selectable in left:
            scope.run(self._disconnectSelectable, selectable, ConnectionAborted(), False)
        return len(left)

    def end_scope(self, scope: Scope) -> int:
        """Close what ``scope`` still watches, then end it: its timers are cancelled and
        whatever of it is still scheduled never runs.  How many were left."""
        left = self.close_descriptors(scope)
        scope.ended = True
        timers = self.timers_of(scope)
        for call in timers:
            call.cancel()
        return left + len(timers)


def _claim(selectable: Any) -> None:
    """A descriptor belongs to the scope that first watched it."""
    scope = current_scope.get()
    if scope is not None and getattr(selectable, SCOPE, None) is None:
        try:
            setattr(selectable, SCOPE, scope)
        except AttributeError:
            pass  # (an object with slots stays the host's)
