"""Where a master's instances run: hosts, each one process with many instances.

:meth:`HostPool.spawn` has the signature of
:func:`~nodepass.master.supervisor.spawn_child` (a Registry's ``spawn``): it places the
instance in a host (nodepass/master/host.py) with room, forking a new one from the
fork server when none has, and hands the instance's ``ChildProcess`` a
:class:`HostedTransport`, so the master sees what it saw of a process of its own: its
status channel, stdout and stderr, a pid (its host's), signals, an exit.

A host is a crash domain: what kills it (a crash, the watchdog) ends every instance
it ran, each reported with the host's end (``killed by SIGKILL``) and flagged
``host_lost``, and those come back by themselves (nodepass/master/restarts.py).  The
watchdog: a host says it is alive every second; one silent for ``NODEPASS_HOST_WATCHDOG``
(a reactor that no longer turns) is killed.
"""

from __future__ import annotations

import os
import signal
import socket
from collections.abc import Mapping
from typing import Any, NamedTuple

from twisted.internet.error import ProcessDone, ProcessExitedAlready, ProcessTerminated
from twisted.internet.task import LoopingCall
from twisted.protocols.basic import LineOnlyReceiver
from twisted.python.failure import Failure

from nodepass import logs
from nodepass.master.forkserver import Forked
from nodepass.master.packets import PacketChannel, encode
from nodepass.master.supervisor import StatusReceiver, adopt, describe_exit
from nodepass.timers import cancelled
from nodepass.tunables import format_duration, parse_duration

SIZE_ENV = "NODEPASS_HOST_SIZE"
SPREAD_ENV = "NODEPASS_HOST_SPREAD"
WATCHDOG_ENV = "NODEPASS_HOST_WATCHDOG"
DEFAULT_SIZE = 16
MAX_SIZE = 1000
DEFAULT_WATCHDOG = 5.0
CHECK_EVERY = 1.0
RETIRE_GRACE = 10.0  # a host told to exit that has not is killed


class HostSettings(NamedTuple):
    size: int  # instances per host at most
    spread: int  # hosts before instances start sharing one
    watchdog: float  # seconds a host may stay silent


def _whole(environ: Mapping[str, str], name: str, default: int, meaning: str) -> int:
    text = environ.get(name, str(default)).strip()
    if not text.isdigit() or not 1 <= int(text) <= MAX_SIZE:
        raise ValueError(f"{name}={text!r}: expected a whole number from 1 {meaning} "
                         f"to {MAX_SIZE}")
    return int(text)


def host_settings(environ: Mapping[str, str]) -> HostSettings:
    """How instances are spread over hosts, from the master's environment; ValueError
    naming the variable and what it may be."""
    size = _whole(environ, SIZE_ENV, DEFAULT_SIZE, "(a process per instance)")
    spread = _whole(environ, SPREAD_ENV, os.cpu_count() or 1, "(share from the start)")
    watchdog_text = environ.get(WATCHDOG_ENV, format_duration(DEFAULT_WATCHDOG)).strip()
    try:
        watchdog = parse_duration(watchdog_text)
    except ValueError:
        watchdog = 0.0
    if watchdog < 2 * CHECK_EVERY:
        raise ValueError(f"{WATCHDOG_ENV}={watchdog_text!r}: expected a duration of at "
                         "least 2s, like 5s")
    return HostSettings(size, spread, watchdog)


def ended(code: int | None, sig: int | None) -> Failure:
    """What ``processEnded`` is told, as a process's end would be."""
    if code == 0 and sig is None:
        return Failure(ProcessDone(0))
    return Failure(ProcessTerminated(code, sig))


class HostedTransport:
    """What a ChildProcess holds for an instance in a host: the host's pid, and
    signals that the host applies to this instance alone."""

    def __init__(self, host: Host, number: int) -> None:
        self.host = host
        self.number = number
        self.exited = False

    @property
    def pid(self) -> int | None:
        return self.host.pid

    def signalProcess(self, sig: int) -> None:
        if self.exited:
            raise ProcessExitedAlready()
        self.host.signal(self.number, sig)


class Host:
    """The master's side of one host process."""

    log = logs.logger("nodepass.master")

    def __init__(self, pool: HostPool, capacity: int) -> None:
        self.pool = pool
        self.reactor = pool.reactor
        self.capacity = capacity
        self.pid: int | None = None
        self.pidfd: int | None = None  # (a signal through it never reaches a reused pid)
        self.instances: dict[int, Any] = {}  # number -> ChildProcess
        self.numbers = 0
        self.alive_at = self.reactor.seconds()
        self.dead = False
        self.retired = False
        self.closing = False  # it said it is stopping (someone sent it SIGTERM)
        self.retire_timer: Any = None
        self.killed_by_watchdog = False
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.channel = PacketChannel(self.reactor, ours, "host", self._message, self._closed)
        output, its_output = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        adopt(self.reactor, output, _HostOutput(self))
        output.close()
        try:
            pool.forkserver.fork([theirs, its_output], Forked(self._forked, self._exited))
        except OSError:
            self.dead = True
            self.channel.close()
            raise

    @property
    def room(self) -> int:
        return self.capacity - len(self.instances)

    @property
    def usable(self) -> bool:
        """Still taking instances: not dying, not retired, its socket open."""
        return not (self.dead or self.retired or self.closing or self.killed_by_watchdog
                    or self.channel.sock is None)

    def start_instance(self, url: str, environ: Mapping[str, str], child: Any) -> None:
        number, self.numbers = self.numbers, self.numbers + 1
        pairs = [socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(3)]
        try:
            self.channel.send({"start": number, "url": url, "env": dict(environ)},
                              [theirs for _, theirs in pairs])
        except OSError:
            for ours, theirs in pairs:
                ours.close()
                theirs.close()
            raise
        child.makeConnection(HostedTransport(self, number))  # running: it may be stopped
        self.instances[number] = child
        (status, _), (out, _), (err, _) = pairs
        child.status_receiver = adopt(self.reactor, status, StatusReceiver(child))
        for sock, fd in ((out, 1), (err, 2)):
            adopt(self.reactor, sock, _Output(child, fd))
        for ours, _ in pairs:
            ours.close()

    def signal(self, number: int, sig: int) -> None:
        try:
            self.channel.send({"signal": number, "sig": sig})
        except OSError:
            pass  # the host is gone: its instances are ended as it is reaped

    def _message(self, message: dict[str, Any], fds: list[int]) -> None:
        for fd in fds:
            os.close(fd)
        if "alive" in message:
            self.alive_at = self.reactor.seconds()
        elif "closing" in message:
            self.closing = True
        elif "exit" in message:
            child = self.instances.pop(message["exit"], None)
            if child is not None:
                child.host_lost = bool(message.get("refused"))  # (the host was stopping)
                _end(child, message.get("code"), message.get("signal"))
            if not self.instances:
                self.retire()  # (its end closing takes it out of the pool)

    def _forked(self, pid: int) -> None:
        self.pid = pid
        self.alive_at = self.reactor.seconds()
        try:
            self.pidfd = os.pidfd_open(pid)
        except OSError:
            pass  # (gone already: its exit is on its way; or no pidfd here)

    def _closed(self) -> None:
        """Our end closed: retired by us, or the host is going; make sure it goes (its
        exit, reported by the fork server, ends what it still ran)."""
        self.pool.forget(self)
        if self.retired:  # (it exits at once, having nothing to stop, unless it is stuck)
            self.retire_timer = self.reactor.callLater(RETIRE_GRACE, self.kill)
        else:
            self.kill()

    def kill(self) -> None:
        if self.pid is None or self.dead:
            return
        try:
            if self.pidfd is not None:
                signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
            else:
                os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def retire(self) -> None:
        """No instance left: the host exits when its end closes."""
        self.retired = True
        self.channel.close()

    def _exited(self, code: int | None, sig: int | None) -> None:
        """The host process ended: whatever it still ran ended with it (a host's loss
        if it had others, its own end if it was alone)."""
        self.dead = True
        self.channel.read_all()  # (its last words — instances' exits — before its end)
        if self.pidfd is not None:
            os.close(self.pidfd)
            self.pidfd = None
        self.retire_timer = cancelled(self.retire_timer)
        self.channel.close()  # (and out of the pool, if it was not already)
        lost, self.instances = list(self.instances.values()), {}
        if lost:
            self.log.error("host {pid} ended ({how}): {n} instance(s) with it",
                           pid=self.pid, how=describe_exit(code, sig), n=len(lost))
        for child in lost:
            child.host_lost = len(lost) > 1  # (alone, its host's end was its own doing)
            _end(child, code if (code or sig) else 1, sig)

    def watch(self, now: float, limit: float) -> None:
        """The watchdog's look: a host silent for ``limit`` seconds is killed."""
        if self.pid is None or self.dead or self.killed_by_watchdog:
            return
        self.channel.doRead()  # (what it said while we were busy counts)
        if now - self.alive_at > limit:
            self.killed_by_watchdog = True
            self.log.error("host {pid} silent for {s:g}s (its reactor is blocked): killed",
                           pid=self.pid, s=round(now - self.alive_at, 1))
            self.kill()


class HostPool:
    """The master's hosts."""

    def __init__(self, reactor: Any, forkserver: Any, settings: HostSettings) -> None:
        self.reactor = reactor
        self.forkserver = forkserver
        self.size = settings.size
        self.spread = settings.spread  # (by default a host per core before any shares)
        self.watchdog = settings.watchdog
        self.hosts: list[Host] = []
        self._loop = LoopingCall(self._watch)
        self._loop.clock = reactor

    def start(self) -> None:
        self.forkserver.start()
        if not self._loop.running:
            self._loop.start(CHECK_EVERY, now=False)

    def stop(self) -> None:
        if self._loop.running:
            self._loop.stop()
        for host in list(self.hosts):
            host.retire()
        self.hosts.clear()
        self.forkserver.stop()  # (it ends any host that does not exit by itself)

    def spawn(self, reactor: Any, url: str, environ: Mapping[str, str], child: Any) -> Any:
        """Start ``url`` in a host (a new one if the chosen one turns out to be going);
        raises OSError when no host can take it."""
        alone = getattr(child, "alone", False)
        encode({"start": 0, "url": url, "env": dict(environ)})  # (too long: no host for it)
        try:
            self._place(alone).start_instance(url, environ, child)
        except OSError:
            self._new(1 if alone else self.size).start_instance(url, environ, child)
        return child

    def _place(self, alone: bool) -> Host:
        if alone:
            return self._new(1)
        open_hosts = [h for h in self.hosts if h.usable and h.room > 0 and h.capacity > 1]
        if not open_hosts or len(self.hosts) < self.spread:
            return self._new(self.size)
        return max(open_hosts, key=lambda h: h.room)

    def _new(self, capacity: int) -> Host:
        host = Host(self, capacity)
        self.hosts.append(host)
        return host

    def forget(self, host: Host) -> None:
        if host in self.hosts:
            self.hosts.remove(host)

    def _watch(self) -> None:
        now = self.reactor.seconds()
        for host in list(self.hosts):
            host.watch(now, self.watchdog)


class _Output:
    """The reading end of an instance's stdout or stderr, as a protocol."""

    def __init__(self, child: Any, fd: int) -> None:
        self.child, self.fd = child, fd

    def makeConnection(self, transport: Any) -> None:
        self.transport = transport

    def dataReceived(self, data: bytes) -> None:
        self.child.childDataReceived(self.fd, data)

    def connectionLost(self, reason: Any) -> None:
        pass


class _HostOutput(LineOnlyReceiver):
    """What a host prints outside every instance's log (a crash of its own)."""

    delimiter = b"\n"

    def __init__(self, host: Host) -> None:
        self.host = host

    def lineReceived(self, line: bytes) -> None:
        self.host.log.error("host {pid}: {line}", pid=self.host.pid,
                            line=line.decode("utf-8", "replace"))


def _end(child: Any, code: int | None, sig: int | None) -> None:
    child.transport.exited = True
    child.processEnded(ended(code, sig))
