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
from weakref import WeakSet

from twisted.internet.base import DelayedCall
from twisted.internet.epollreactor import EPollReactor
from twisted.internet.error import ConnectionAborted
from twisted.python.threadpool import ThreadPool

from nodepass.logs import Scope, current_scope, logger

log = logger("nodepass.master")

SCOPE = "nodepass_scope"  # the attribute a descriptor carries its scope in
SWEEPS = 5


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

    def __init__(self) -> None:
        super().__init__()
        self._swept: WeakSet[Any] = WeakSet()  # closed by end_scope (one without
        # a ``disconnected`` flag, a spliced socket, is closed once)

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
        if scope is None or scope is HOST:
            super()._doReadOrWrite(selectable, fd, event)
        elif scope.ended:
            scope.enter(self._disconnectSelectable, selectable, ConnectionAborted(), False)
        else:
            scope.run(super()._doReadOrWrite, selectable, fd, event)

    def _initThreadPool(self) -> None:
        self.threadpool = _ScopedThreadPool(0, 10, "twisted.internet.reactor")
        self._threadpoolStartupID = self.callWhenRunning(self.threadpool.start)
        self.threadpoolShutdownID = self.addSystemEventTrigger(
            "during", "shutdown", self._stopThreadPool)

    # -- ending one instance's everything ------------------------------------

    def timers_of(self, scope: Scope) -> list[DelayedCall]:
        return [c for c in self.getDelayedCalls()
                if c.active() and getattr(c.func, "__self__", None) is scope]

    def end_scope(self, scope: Scope) -> int:
        """End ``scope``: every descriptor it ever watched and has not closed — its
        listeners, connections (paused ones too), spliced sockets, status channel — is
        closed now as an aborted connection (a port's own close would come at the next
        turn, which an ended scope never gets), its timers are cancelled, and whatever
        of it is still scheduled never runs.  How many were left."""
        closed = 0
        for _ in range(SWEEPS):  # (closing one may open another: a reconnect, say)
            left = [d for d in list(scope.descriptors)
                    if not getattr(d, "disconnected", False) and d not in self._swept]
            if not left:
                break
            for selectable in left:
                self._swept.add(selectable)
                try:
                    scope.enter(self._disconnectSelectable, selectable, ConnectionAborted(),
                                False)
                except Exception:
                    log.failure("closing {what} of an ended instance", what=selectable)
            closed += len(left)
        scope.ended = True
        timers = self.timers_of(scope)
        for call in timers:
            call.cancel()
        return closed + len(timers)


class _Host:
    """The scope of what the host itself watches (its socket to the master, the
    reactor's waker): marked, so that no instance claims it later."""

    def __repr__(self) -> str:
        return "<the host's own>"


HOST = _Host()


def _claim(selectable: Any) -> None:
    """A descriptor belongs to the scope that first watched it (none: the host)."""
    if getattr(selectable, SCOPE, None) is not None:
        return
    scope = current_scope.get()
    try:
        setattr(selectable, SCOPE, HOST if scope is None else scope)
    except AttributeError:
        return  # (an object with slots stays the host's)
    if scope is not None:
        scope.descriptors.add(selectable)
