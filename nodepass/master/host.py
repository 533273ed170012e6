"""A host: one process, one reactor, many instances — each its own service tree.

The fork server forks a host on the master's request; the master then sends it, on
the host's own ``SOCK_SEQPACKET`` socket:

- ``{"start": N, "url": ..., "env": {...}}`` with the instance's status channel,
  stdout and stderr attached: the host builds the instance's service tree exactly as
  ``nodepass -`` would (``tap.Options``, ``tap.makeService``) and starts it;
- ``{"signal": N, "sig": S}``: SIGTERM/SIGINT stop instance N gracefully (as the
  signal would stop its own process), SIGKILL ends it at once.

and the host answers ``{"exit": N, "code": C, "signal": S}`` when instance N has
ended, and ``{"alive": K}`` every :data:`HEARTBEAT` seconds (K instances): the
master's watchdog kills a host that stops saying so (a blocked reactor).

Each instance runs in its own :class:`~nodepass.logs.Scope` on a
:class:`~nodepass.master.hostreactor.ScopedReactor`: its log events go to its own
status channel at its own level, a fatal error stops it alone
(:class:`HostedRoot`), and once it has ended nothing of it is left running — its
descriptors are closed and its timers cancelled.  When the master's end closes the
host stops every instance gracefully (at most SHUTDOWN_TIMEOUT and a grace) and
exits: no orphans.
"""

from __future__ import annotations

import io
import os
import signal
import socket
import sys
import traceback
from typing import Any

from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.task import LoopingCall
from twisted.python import usage

from nodepass import logs
from nodepass.root import RootService
from nodepass.timers import cancelled

HEARTBEAT = 1.0
KILL_GRACE = 2.0  # the master's and a host's: after SHUTDOWN_TIMEOUT, a stop becomes a kill


class HostedRoot(RootService):
    """An instance's root in a host: a fatal error, or its status channel closing,
    stops this instance (not the reactor, which others run on)."""

    def __init__(self, reactor: Any, instance: HostedInstance) -> None:
        super().__init__(reactor)
        self.instance = instance

    def stop(self) -> None:
        self.instance.stop()


class HostedInstance(logs.Scope):
    """One instance in a host: its scope, its descriptors, its service tree."""

    def __init__(self, host: Host, number: int, fds: list[int]) -> None:
        super().__init__()
        self.host = host
        self.number = number
        self.fds = fds  # status channel, stdout, stderr: ours, closed when it ends
        self.root: HostedRoot | None = None
        self.shutdown_timeout = 0.0
        self.starting = False
        self.stopping = False
        self.ending = False
        self.stop_after_start = False
        self.finished: Deferred[None] = Deferred()

    def start(self, url: str, env: dict[str, str]) -> None:
        """Build and start its tree (in its scope).  A fatal error while starting (a port
        taken) stops it once every service has started, not half-way through."""
        self.starting = True
        try:
            self._start(url, env)
        finally:
            self.starting = False
        if self.stop_after_start:
            self.stop()

    def _start(self, url: str, env: dict[str, str]) -> None:
        from nodepass import tap
        from nodepass.statuschannel import ENV

        # (the status channel owns a copy, closed when it stops; ours, when we end)
        channel = os.dup(self.fds[0])
        options = tap.Options({**env, ENV: str(channel)}, stdin=io.StringIO(url + "\n"))
        try:
            options.parseOptions(["-"])
        except BaseException as e:
            os.close(channel)
            if not isinstance(e, usage.UsageError):
                raise
            self._print(f"nodepass: error: {e}\n")
            self.end(code=2)
            return
        self.shutdown_timeout = options["tunables"].shutdown_timeout
        self.root = HostedRoot(self.host.reactor, self)
        early: list[dict[str, Any]] = []  # (what it logs before its sink is known)
        self.sink = early.append
        try:
            tap.makeService(options, self.host.reactor, root=self.root)
        except BaseException:
            os.close(channel)
            raise
        self.sink = self.root.log_sink
        if self.sink is not None:
            for event in early:
                self.sink(event)
        self.root.startService()

    def stop(self) -> None:
        """Stop gracefully (SIGTERM, a fatal error, the master gone): at most
        SHUTDOWN_TIMEOUT and a grace, then it is ended as if killed."""
        if self.starting:
            self.stop_after_start = True
            return
        if self.stopping or self.ending:
            return
        self.stopping = True
        assert self.root is not None
        stopped = self.root.stopService() if self.root.running else succeed(None)
        timer = self.host.reactor.callLater(self.shutdown_timeout + KILL_GRACE,
                                            self.end, None, signal.SIGKILL)
        stopped.addBoth(lambda _: (cancelled(timer), self.end()))

    def end(self, code: int | None = None, sig: int | None = None) -> None:
        """Nothing of this instance runs from now on; the master hears how it ended."""
        if self.ending:  # (closing its status channel below would stop it: once is enough)
            return
        self.ending = True
        try:
            if self.root is not None and self.root.running:
                # Killed: its services let go of what they hold (their status channel
                # sends its last report); what they only began to close is closed below.
                self.enter(self.root.stopService)
        except Exception:
            self.host.log.failure("instance {n}: stopping its services", n=self.number)
        finally:
            self.host.reactor.end_scope(self)
            self.sink = None
            for fd in self.fds:
                os.close(fd)
            if code is None and sig is None:
                code = self.root.exit_status if self.root is not None else 1
            self.host.exited(self, code, sig)  # (before the host may stop, below)
            self.finished.callback(None)

    def _print(self, text: str) -> None:
        if self.ending:
            return
        try:
            os.write(self.fds[2], text.encode("utf-8", "replace"))
        except OSError:
            pass

    def crashed(self) -> None:
        """Its start raised: the traceback goes to its stderr, as a process's would."""
        self._print(traceback.format_exc())
        self.end(code=1)


class Host:
    """The host's side of its channel to the master, and the instances it runs."""

    log = logs.logger("nodepass.master")

    def __init__(self, reactor: Any, control: socket.socket) -> None:
        from nodepass.master.packets import PacketChannel

        self.reactor = reactor
        self.closing = False  # stopping every instance: it takes no new one
        self.instances: dict[int, HostedInstance] = {}
        self.channel = PacketChannel(reactor, control, "host", self._message, self._master_gone)
        self.heartbeat = LoopingCall(self._alive)
        self.heartbeat.clock = reactor

    def start(self) -> None:
        self.heartbeat.start(HEARTBEAT, now=True)
        self.reactor.addSystemEventTrigger("before", "shutdown", self.stop_all)

    def _alive(self) -> None:
        self._send({"alive": len(self.instances)})

    def _send(self, message: dict[str, Any]) -> None:
        try:
            logs.outside_scopes(self.channel.send, message)
        except OSError:
            pass  # the master is gone: _master_gone stops everything

    def _message(self, message: dict[str, Any], fds: list[int]) -> None:
        if "start" in message:
            self._start(message, fds)
            return
        for fd in fds:
            os.close(fd)
        if "signal" in message:
            instance = self.instances.get(message["signal"])
            if instance is None:
                return
            if message.get("sig") == signal.SIGKILL:
                instance.end(sig=signal.SIGKILL)
            elif message.get("sig") in (signal.SIGTERM, signal.SIGINT):
                instance.run(instance.stop)

    def _start(self, message: dict[str, Any], fds: list[int]) -> None:
        number = message["start"]
        if self.closing or len(fds) != 3 or not isinstance(number, int) \
                or number in self.instances:
            for fd in fds:
                os.close(fd)
            self._send({"exit": number, "code": 1, "signal": None,
                        "refused": "the host is stopping" if self.closing else "malformed"})
            return
        instance = HostedInstance(self, number, fds)
        self.instances[number] = instance
        try:
            instance.run(instance.start, str(message.get("url", "")),
                         dict(message.get("env", {})))
        except Exception:
            instance.crashed()

    def exited(self, instance: HostedInstance, code: int | None, sig: int | None) -> None:
        self.instances.pop(instance.number, None)
        self._send({"exit": instance.number, "code": code, "signal": sig})

    def stop_all(self) -> Deferred[Any]:
        """Every instance stopped gracefully (each within its own bound); the master is
        told to send no new one (one already on its way is refused, and placed again)."""
        self.closing = True
        self._send({"closing": True})
        waiting = [i.finished for i in self.instances.values()]
        for instance in list(self.instances.values()):
            instance.run(instance.stop)
        return DeferredList(waiting)

    def _master_gone(self) -> None:
        if self.reactor.running:
            self.reactor.stop()


def serve(control: socket.socket) -> None:
    """Run a host on ``control`` until the master's end closes (in a forked child)."""
    from twisted.internet import main

    from nodepass.master.hostreactor import ScopedReactor

    reactor = ScopedReactor()
    main.installReactor(reactor)
    logs.gate.process.set_level("warn")
    logs.start_scoped_logging(sys.stderr)
    host = Host(reactor, control)
    reactor.callWhenRunning(host.start)
    # (after Twisted's own handlers: ^C in a terminal reaches the whole process group,
    # and the master decides what stops; SIGTERM still stops every instance, gracefully)
    reactor.callWhenRunning(signal.signal, signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # (a tls=2 instance reloads on it)
    reactor.run()
