"""Instances forked from a process that has already imported them.

A fresh ``python -m nodepass`` spends ~300 ms and ~28 MiB of private memory importing
the interpreter's, Twisted's, cryptography's and nodepass's modules before it listens.
The master therefore starts one *fork server* at start-up: ``python -m
nodepass.master.forkserver``, which imports what an instance runs (no reactor yet),
freezes those objects out of the garbage collector's reach (``gc.freeze``: a collection
in a child would otherwise touch, and so copy, every page they live on) and then forks
one child per instance asked for.  A child shares those pages with the fork server and
its siblings until it writes to them, and is listening a few milliseconds after the
request.

Each instance is still a process of its own, with everything that gives (docs/how-it-
works.md): a crash, a leak or a blocked reactor stays in it; SIGTERM/SIGKILL stop it at
once; it exits when the master's status channel closes.

The request travels on a ``SOCK_SEQPACKET`` Unix socket: one JSON message (the URL and
the environment — the URL never in an argument) with three descriptors attached by
``SCM_RIGHTS``: the instance's status channel (fd 3) and its stdout and stderr.  The
fork server answers ``{"pid": N}``, later ``{"exit": N, "code": C, "signal": S}``
(it is the children's parent, so it reaps them), and exits when the master's end
closes.
"""

from __future__ import annotations

import array
import gc
import io
import json
import os
import selectors
import signal
import socket
import sys
from collections import deque
from collections.abc import Mapping
from typing import Any

from nodepass import logs

MAX_MESSAGE = 256 * 1024
FDS = 3  # status channel, stdout, stderr


# ---------------------------------------------------------------------------
# The fork server process (no Twisted reactor: it must not exist before a fork)


def _preload() -> None:
    """What every instance imports, imported once here."""
    import twisted.internet.epollreactor  # noqa: F401

    import nodepass.cli
    import nodepass.endpoints
    import nodepass.statuschannel
    import nodepass.tap
    import nodepass.tunnel.client
    import nodepass.tunnel.direct
    import nodepass.tunnel.server  # noqa: F401


def _receive(control: socket.socket) -> tuple[bytes, list[int]]:
    fds = array.array("i")
    data, ancillary, _, _ = control.recvmsg(MAX_MESSAGE, socket.CMSG_SPACE(FDS * fds.itemsize))
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
    return data, list(fds)


def _child(control: socket.socket, selector: selectors.BaseSelector, wakeup: tuple[int, int],
           request: dict[str, Any], fds: list[int]) -> None:
    """In the forked child: become ``nodepass -`` with the request's URL; never return."""
    code = 1
    try:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)  # (as any process has)
        selector.close()
        control.close()
        for fd in wakeup:
            os.close(fd)
        status, out, err = fds
        null = os.open(os.devnull, os.O_RDONLY)
        for source, target in ((null, 0), (out, 1), (err, 2), (status, 3)):
            os.dup2(source, target)
        for fd in (null, out, err, status):
            if fd > 3:
                os.close(fd)
        os.environ.clear()
        os.environ.update(request["env"])
        sys.stdin = io.StringIO(request["url"] + "\n")
        sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), line_buffering=True)
        sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), line_buffering=True)
        # (the imported objects stay frozen: a collection here would write to each of
        # them, copying every shared page they live on)
        from nodepass import cli

        code = cli.main(["-"], environ=os.environ)
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def _reap(control: socket.socket) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else None
        sig = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
        control.send(json.dumps({"exit": pid, "code": code, "signal": sig}).encode())


def serve(control: socket.socket) -> None:
    """Fork a child per request until the master's end closes."""
    _preload()
    gc.collect()
    gc.freeze()
    wake_read, wake_write = os.pipe()
    os.set_blocking(wake_write, False)
    signal.set_wakeup_fd(wake_write)
    signal.signal(signal.SIGCHLD, lambda signum, frame: None)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # (the master decides; ^C reaches it)
    selector = selectors.DefaultSelector()
    selector.register(control, selectors.EVENT_READ)
    selector.register(wake_read, selectors.EVENT_READ)
    while True:
        for key, _ in selector.select():
            if key.fileobj == wake_read:
                os.read(wake_read, 4096)
                _reap(control)
                continue
            data, fds = _receive(control)
            if not data:
                return  # the master is gone: the children follow by their status channels
            try:
                request = json.loads(data)
                if len(fds) != FDS:
                    raise ValueError(f"{len(fds)} descriptors")
                pid = os.fork()
            except (ValueError, OSError) as e:
                for fd in fds:
                    os.close(fd)
                control.send(json.dumps({"error": str(e)}).encode())
                continue
            if pid == 0:
                _child(control, selector, (wake_read, wake_write), request, fds)
            for fd in fds:
                os.close(fd)
            control.send(json.dumps({"pid": pid}).encode())


# ---------------------------------------------------------------------------
# The master's side


class _Output:
    """The reading end of a child's stdout or stderr, as a protocol."""

    def __init__(self, child: Any, fd: int) -> None:
        self.child, self.fd = child, fd

    def makeConnection(self, transport: Any) -> None:
        self.transport = transport

    def dataReceived(self, data: bytes) -> None:
        self.child.childDataReceived(self.fd, data)

    def connectionLost(self, reason: Any) -> None:
        pass


class ForkedTransport:
    """What a ChildProcess holds for a forked child: its pid (once the fork server said
    it) and a way to signal it (a signal asked for before the pid came waits for it)."""

    def __init__(self) -> None:
        self.pid: int | None = None
        self.exited = False
        self.pending: int | None = None

    def forked(self, pid: int) -> None:
        from twisted.internet.error import ProcessExitedAlready

        self.pid = pid
        if self.pending is not None:
            sig, self.pending = self.pending, None
            try:
                self.signalProcess(sig)
            except ProcessExitedAlready:
                pass

    def signalProcess(self, sig: int) -> None:
        from twisted.internet.error import ProcessExitedAlready

        if self.exited:
            raise ProcessExitedAlready()
        if self.pid is None:
            self.pending = sig
            return
        try:
            os.kill(self.pid, sig)
        except ProcessLookupError:
            raise ProcessExitedAlready() from None


class ForkServer:
    """The master's fork server: :meth:`spawn` has the signature of
    :func:`~nodepass.master.supervisor.spawn_child` (a Registry's ``spawn``).  A fork
    server that died is replaced at the next spawn (its children were ended)."""

    def __init__(self, reactor: Any, environ: Mapping[str, str]) -> None:
        self.reactor = reactor
        self.environ = dict(environ)
        self.current: _ForkServerProcess | None = None

    def start(self) -> None:
        if self.current is None or self.current.control is None:
            self.current = _ForkServerProcess(self.reactor, self.environ)
            self.current.start()

    def stop(self) -> None:
        if self.current is not None:
            self.current.stop()

    def spawn(self, reactor: Any, url: str, environ: Mapping[str, str], child: Any) -> Any:
        """Fork ``nodepass -`` for ``url`` with its status channel on fd 3; raises
        OSError when the fork server cannot take the request."""
        self.start()
        assert self.current is not None
        return self.current.spawn(reactor, url, environ, child)


class _ForkServerProcess:
    """One fork server process and the children it forked.

    Requests wait in ``outgoing`` while the fork server's socket is full (it reads none
    while it imports, at start); each message read is handled on its own, so one that
    cannot be makes no other fail.
    """

    log = logs.logger("nodepass.master")

    def __init__(self, reactor: Any, environ: Mapping[str, str]) -> None:
        self.reactor = reactor
        self.environ = environ
        self.control: socket.socket | None = None
        self.outgoing: deque[tuple[bytes, list[socket.socket], Any]] = deque()
        self.waiting: deque[Any] = deque()  # children sent for, whose pid is yet to come
        self.children: dict[int, Any] = {}
        self.exited: dict[int, tuple[int | None, int | None]] = {}  # before their pid came
        self.writing = False
        self.dead = False

    def start(self) -> None:
        from twisted.internet.protocol import ProcessProtocol

        master_end, server_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        master_end.setblocking(False)
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
        self.control = master_end
        self.reactor.addReader(self)

    def stop(self) -> None:
        """Closing our end ends the fork server (the master stops, or it died)."""
        if self.control is not None:
            self.reactor.removeReader(self)
            if self.writing:
                self.reactor.removeWriter(self)
                self.writing = False
            self.control.close()
            self.control = None

    # IReadDescriptor, IWriteDescriptor
    def fileno(self) -> int:
        return self.control.fileno() if self.control is not None else -1

    def logPrefix(self) -> str:
        return "forkserver"

    def connectionLost(self, reason: Any) -> None:
        self.stop()

    def doRead(self) -> None:
        while self.control is not None:
            try:
                data = self.control.recv(MAX_MESSAGE)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                self.stop()
                return
            try:
                self._message(json.loads(data))
            except Exception:
                self.log.failure("fork server message not handled")

    def doWrite(self) -> None:
        self._flush()

    def _flush(self) -> None:
        while self.outgoing and self.control is not None:
            request, ends, child = self.outgoing[0]
            try:
                self.control.sendmsg([request], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                                  array.array("i", [e.fileno() for e in ends]))])
            except BlockingIOError:
                if not self.writing:
                    self.reactor.addWriter(self)
                    self.writing = True
                return
            except OSError:  # the fork server is gone; its end shows it soon
                self._gone()
                return
            self.outgoing.popleft()
            for end in ends:
                end.close()
            self.waiting.append(child)
        if self.writing:
            self.reactor.removeWriter(self)
            self.writing = False

    def _message(self, message: dict[str, Any]) -> None:
        if "pid" in message or "error" in message:
            child = self.waiting.popleft()
            if "error" in message:
                self._end(child, 1, None)
                return
            pid = message["pid"]
            self.children[pid] = child
            child.transport.forked(pid)
            if pid in self.exited:
                self._end(self.children.pop(pid), *self.exited.pop(pid))
        elif "exit" in message:
            pid = message["exit"]
            if pid in self.children:
                self._end(self.children.pop(pid), message.get("code"), message.get("signal"))
            else:
                self.exited[pid] = (message.get("code"), message.get("signal"))

    @staticmethod
    def _end(child: Any, code: int | None, sig: int | None) -> None:
        child.transport.exited = True
        child.processEnded(_ended(code, sig))

    def _gone(self) -> None:
        """The fork server died.  What it said before is read first; its children can
        no longer be reaped by us, so those with a pid are ended (SIGKILL), those whose
        pid never came lose their status channel (and so stop by themselves), and all
        are reported; the next start forks from a new fork server."""
        if self.dead:
            return
        self.dead = True
        if self.control is not None:
            self.doRead()
            self.stop()
        for pid, child in list(self.children.items()):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self._end(child, None, signal.SIGKILL)
        self.children.clear()
        unsent = [child for _, _, child in self.outgoing]
        for _, ends, _ in self.outgoing:
            for end in ends:
                end.close()
        self.outgoing.clear()
        for child in [*self.waiting, *unsent]:
            status = getattr(child, "status_receiver", None)
            if status is not None and status.transport is not None:
                status.transport.loseConnection()
            self._end(child, None, signal.SIGKILL)
        self.waiting.clear()

    # -- spawning ----------------------------------------------------------

    def spawn(self, reactor: Any, url: str, environ: Mapping[str, str], child: Any) -> Any:
        from nodepass.master.supervisor import StatusReceiver, adopt
        from nodepass.statuschannel import ENV

        if self.control is None:
            raise OSError("the fork server is gone")
        pairs = [socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(FDS)]
        env = dict(environ)
        env[ENV] = "3"
        request = json.dumps({"url": url, "env": env}).encode()
        if len(request) > MAX_MESSAGE:
            for a, b in pairs:
                a.close()
                b.close()
            raise OSError(f"the request is over {MAX_MESSAGE} bytes")
        child.makeConnection(ForkedTransport())  # running from now: it may be stopped
        (status, _), (out, _), (err, _) = pairs
        child.status_receiver = adopt(reactor, status, StatusReceiver(child))
        for sock, fd in ((out, 1), (err, 2)):
            adopt(reactor, sock, _Output(child, fd))
        for ours, _ in pairs:
            ours.close()
        self.outgoing.append((request, [theirs for _, theirs in pairs], child))
        self._flush()
        return child


def _ended(code: int | None, sig: int | None) -> Any:
    from twisted.internet.error import ProcessDone, ProcessTerminated
    from twisted.python.failure import Failure

    if code == 0 and sig is None:
        return Failure(ProcessDone(0))
    return Failure(ProcessTerminated(code, sig))


def main() -> None:
    serve(socket.socket(fileno=3))


if __name__ == "__main__":
    main()
