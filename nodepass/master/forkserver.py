"""Hosts forked from a process that has already imported what they run.

A fresh ``python -m nodepass`` spends ~300 ms and ~28 MiB of private memory importing
the interpreter's, Twisted's, cryptography's and nodepass's modules before it listens.
The master therefore starts one *fork server* at start-up: ``python -m
nodepass.master.forkserver``, which imports what an instance runs (no reactor yet),
freezes those objects out of the garbage collector's reach (``gc.freeze``: a collection
in a child would otherwise touch, and so copy, every page they live on) and then forks
one *host* (nodepass/master/host.py) each time the master asks.  A host shares those
pages with the fork server and its siblings until it writes to them, and runs as many
instances as the master gives it, each in its own scope on the host's one reactor.

The request travels on a ``SOCK_SEQPACKET`` Unix socket (nodepass/master/packets.py):
``{"env": {...}}`` with the host's end of its own socket to the master and its
stderr (stdout too) attached by ``SCM_RIGHTS``.  The fork server answers ``{"pid":
N}``, later ``{"exit": N, "code": C, "signal": S}`` (it is the hosts' parent, so it
reaps them), and exits when the master's end closes.
"""

from __future__ import annotations

import gc
import json
import os
import select
import selectors
import signal
import socket
import sys
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

from nodepass import logs
from nodepass.master.packets import PacketChannel, encode, receive


def _hosts_grace(environ: Mapping[str, str]) -> float:
    """How long hosts may take to stop once the master is gone: their instances'
    SHUTDOWN_TIMEOUT and grace, and the watchdog's patience."""
    from nodepass.master.host import KILL_GRACE
    from nodepass.master.hosts import host_settings
    from nodepass.tunables import from_environ

    try:
        return (from_environ(environ).shutdown_timeout + KILL_GRACE
                + host_settings(environ).watchdog)
    except ValueError:
        return 15.0

# ---------------------------------------------------------------------------
# The fork server process (no Twisted reactor: it must not exist before a fork)


def _preload() -> None:
    """What every host imports, imported once here."""
    import twisted.internet.epollreactor  # noqa: F401

    import nodepass.cli
    import nodepass.endpoints
    import nodepass.master.host
    import nodepass.master.hostreactor
    import nodepass.statuschannel
    import nodepass.tap
    import nodepass.tunnel.client
    import nodepass.tunnel.direct
    import nodepass.tunnel.server  # noqa: F401


def _child(control: socket.socket, selector: selectors.BaseSelector, wakeup: tuple[int, int],
           request: dict[str, Any], fds: list[int]) -> None:
    """In the forked child: become a host on ``fds`` (its socket, its output); never
    return.  (Its output is not ours: a host holding the fork server's pipes would hide
    the fork server's end from the master.)"""
    code = 1
    try:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # (the reactor installs its own)
        selector.close()
        control.close()
        for end in wakeup:
            os.close(end)
        host_end, output = fds
        null = os.open(os.devnull, os.O_RDONLY)
        for source, target in ((null, 0), (output, 1), (output, 2)):
            os.dup2(source, target)
        os.close(null)
        os.close(output)
        os.environ.clear()
        os.environ.update(request["env"])
        # (the imported objects stay frozen: a collection here would write to each of
        # them, copying every shared page they live on)
        from nodepass.master import host

        host.serve(socket.socket(fileno=host_end))
        code = 0
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def _reap(control: socket.socket, hosts: set[int]) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        hosts.discard(pid)
        code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else None
        sig = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
        try:
            control.send(encode({"exit": pid, "code": code, "signal": sig}))
        except OSError:
            pass  # the master is gone


def _outlive(hosts: set[int], control: socket.socket, wake_read: int) -> None:
    """The master is gone: its hosts stop their instances (each within SHUTDOWN_TIMEOUT
    and a grace) and exit; one that has not by then and the watchdog's time — its
    reactor blocked — is killed, so none outlives the master."""
    deadline = time.monotonic() + _hosts_grace(os.environ)
    while hosts and (left := deadline - time.monotonic()) > 0:
        if select.select([wake_read], [], [], left)[0]:
            os.read(wake_read, 4096)
        _reap(control, hosts)
    for pid in hosts:
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass


def serve(control: socket.socket) -> None:
    """Fork a host per request until the master's end closes."""
    _preload()
    gc.collect()
    gc.freeze()
    wake_read, wake_write = os.pipe()
    os.set_blocking(wake_write, False)
    signal.set_wakeup_fd(wake_write)
    signal.signal(signal.SIGCHLD, lambda signum, frame: None)
    # (the master decides, and its socket closing ends us: a SIGTERM to the whole group —
    # ^C, systemd's KillMode=control-group — must not cut the hosts' graceful stops short)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # (meant for a tls=2 instance's reload)
    hosts: set[int] = set()
    selector = selectors.DefaultSelector()
    selector.register(control, selectors.EVENT_READ)
    selector.register(wake_read, selectors.EVENT_READ)
    while True:
        for key, _ in selector.select():
            if key.fileobj == wake_read:
                os.read(wake_read, 4096)
                _reap(control, hosts)
                continue
            data, fds = receive(control)
            if not data:
                _outlive(hosts, control, wake_read)
                return
            try:
                request = json.loads(data)
                if len(fds) != 2:
                    raise ValueError(f"{len(fds)} descriptors")
                pid = os.fork()
            except (ValueError, OSError) as e:
                for fd in fds:
                    os.close(fd)
                control.send(encode({"error": str(e)}))
                continue
            if pid == 0:
                _child(control, selector, (wake_read, wake_write), request, fds)
            hosts.add(pid)
            for fd in fds:
                os.close(fd)
            control.send(encode({"pid": pid}))


# ---------------------------------------------------------------------------
# The master's side


class Forked:
    """What the master waits to hear of one host it asked for: ``forked(pid)`` once the
    fork server forked it, ``exited(code, signal)`` once it ended (or could not be)."""

    def __init__(self, forked: Callable[[int], None],
                 exited: Callable[[int | None, int | None], None]) -> None:
        self.forked = forked
        self.exited = exited


class ForkServer:
    """The master's fork server: :meth:`fork` asks it for a host.  A fork server that
    died is replaced at the next fork (the hosts it forked were ended)."""

    def __init__(self, reactor: Any, environ: Mapping[str, str]) -> None:
        self.reactor = reactor
        self.environ = dict(environ)
        self.current: _ForkServerProcess | None = None

    def start(self) -> None:
        if self.current is None or self.current.channel is None:
            self.current = _ForkServerProcess(self.reactor, self.environ)
            self.current.start()

    def stop(self) -> None:
        if self.current is not None:
            self.current.stop()

    def fork(self, ends: list[socket.socket], forked: Forked) -> None:
        """Fork a host on ``ends`` (its socket and its output, closed here once sent);
        raises OSError when the fork server cannot take the request."""
        self.start()
        assert self.current is not None
        self.current.fork(ends, forked)


class _ForkServerProcess:
    """One fork server process and the hosts it forked.

    Requests wait while the fork server's socket is full (it reads none while it
    imports, at start); a fork server that dies is read to its last message before
    its hosts are ended.
    """

    log = logs.logger("nodepass.master")

    def __init__(self, reactor: Any, environ: Mapping[str, str]) -> None:
        self.reactor = reactor
        self.environ = environ
        self.channel: PacketChannel | None = None
        self.waiting: deque[Forked] = deque()  # sent for, their pid yet to come
        self.hosts: dict[int, Forked] = {}
        self.exited: dict[int, tuple[int | None, int | None]] = {}  # before their pid came
        self.dead = False

    def start(self) -> None:
        from twisted.internet.protocol import ProcessProtocol

        master_end, server_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        owner = self

        class _Process(ProcessProtocol):
            def errReceived(self, data: bytes) -> None:
                for line in data.decode("utf-8", "replace").splitlines():
                    owner.log.error("fork server: {line}", line=line)

            def processEnded(self, reason: Any) -> None:
                owner._gone()

        try:
            self.reactor.spawnProcess(
                _Process(), sys.executable,
                [sys.executable, "-m", "nodepass.master.forkserver"],
                env=self.environ, childFDs={0: "w", 1: "r", 2: "r", 3: server_end.fileno()})
        except BaseException:
            master_end.close()
            raise
        finally:
            server_end.close()
        self.channel = PacketChannel(self.reactor, master_end, "forkserver", self._message,
                                     self._closed)

    def stop(self) -> None:
        """Closing our end ends the fork server (the master stops, or it died)."""
        if self.channel is not None:
            self.channel.close()

    def _closed(self) -> None:
        self.channel = None

    def fork(self, ends: list[socket.socket], forked: Forked) -> None:
        if self.channel is None:
            for end in ends:
                end.close()
            raise OSError("the fork server is gone")
        self.channel.send({"env": self.environ}, ends, lambda: self.waiting.append(forked))

    def _message(self, message: dict[str, Any], fds: list[int]) -> None:
        for fd in fds:
            os.close(fd)
        if "pid" in message or "error" in message:
            forked = self.waiting.popleft()
            if "error" in message:
                forked.exited(1, None)
                return
            pid = message["pid"]
            self.hosts[pid] = forked
            forked.forked(pid)
            if pid in self.exited:
                self.hosts.pop(pid).exited(*self.exited.pop(pid))
        elif "exit" in message:
            pid = message["exit"]
            outcome = (message.get("code"), message.get("signal"))
            if pid in self.hosts:
                self.hosts.pop(pid).exited(*outcome)
            else:
                self.exited[pid] = outcome

    def _gone(self) -> None:
        """The fork server died.  What it said before is read first; its hosts can no
        longer be reaped by us, so those with a pid are ended (SIGKILL), and every
        host is reported; the next fork comes from a new fork server."""
        if self.dead:
            return
        self.dead = True
        if self.channel is not None:
            channel = self.channel
            channel.read_all()
            for _, _, sent in channel.unsent():
                if sent is not None:  # (as if sent: it waits for its answer, ended below)
                    sent()
            channel.close()
        for pid, forked in list(self.hosts.items()):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            forked.exited(None, signal.SIGKILL)
        self.hosts.clear()
        for forked in list(self.waiting):
            forked.exited(None, signal.SIGKILL)
        self.waiting.clear()


def main() -> None:
    serve(socket.socket(fileno=3))


if __name__ == "__main__":
    main()
