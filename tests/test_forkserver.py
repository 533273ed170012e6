"""The master's side of the fork server, in memory: requests queue while the fork
server does not read, go out in order, and a fork server that dies ends its children."""

from __future__ import annotations

import array
import json
import signal
import socket

from twisted.internet.error import ProcessTerminated
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.testing import MemoryReactor
from twisted.trial.unittest import SynchronousTestCase

from nodepass.master.forkserver import FDS, MAX_MESSAGE, ForkedTransport, _ForkServerProcess


class Child(ProcessProtocol):
    def __init__(self) -> None:
        self.ended = None

    def processEnded(self, reason) -> None:
        self.ended = reason


def _read_all(sock: socket.socket) -> list[tuple[dict, int]]:
    """Every message waiting on the fork server's end: (request, descriptors attached)."""
    got = []
    while True:
        try:
            data, ancillary, _, _ = sock.recvmsg(
                MAX_MESSAGE, socket.CMSG_SPACE(FDS * array.array("i").itemsize))
        except BlockingIOError:
            return got
        fds = array.array("i")
        for _, _, payload in ancillary:
            fds.frombytes(payload)
        for fd in fds:
            socket.socket(fileno=fd).close()
        got.append((json.loads(data), len(fds)))


class Requests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = MemoryReactor()
        self.process = _ForkServerProcess(self.reactor, {})
        ours, self.theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        ours.setblocking(False)
        self.theirs.setblocking(False)
        self.addCleanup(self.theirs.close)
        self.process.control = ours
        self.addCleanup(self.process.stop)

    def test_requests_wait_while_the_fork_server_is_not_reading(self):
        children = [Child() for _ in range(300)]
        for n, child in enumerate(children):
            self.process.spawn(self.reactor, f"server://k@127.0.0.1:0/127.0.0.1:{n}",
                               {"PAD": "x" * 1500}, child)
        self.assertTrue(self.process.outgoing)  # its socket is full: the rest waits
        self.assertIn(self.process, self.reactor.getWriters())
        got = []
        while self.process.outgoing:
            got += _read_all(self.theirs)
            self.process.doWrite()
        got += _read_all(self.theirs)
        self.assertEqual([r["url"] for r, _ in got],
                         [f"server://k@127.0.0.1:0/127.0.0.1:{n}" for n in range(300)])
        self.assertEqual({fds for _, fds in got}, {FDS})
        self.assertNotIn(self.process, self.reactor.getWriters())
        self.assertEqual(list(self.process.waiting), children)

    def test_a_dead_fork_server_ends_every_child_it_had(self):
        forked, sent, unsent = Child(), Child(), Child()
        for child in (forked, sent):
            self.process.spawn(self.reactor, "server://k@127.0.0.1:0/127.0.0.1:0", {}, child)
        _read_all(self.theirs)
        self.theirs.send(json.dumps({"pid": 2 ** 22 + 7}).encode())  # no such process
        self.process.doRead()
        self.assertEqual(forked.transport.pid, 2 ** 22 + 7)
        unsent.makeConnection(ForkedTransport())
        self.process.outgoing.append((b"{}", [], unsent))  # (as if the socket were full)
        self.process._gone()
        for child in (forked, sent, unsent):
            child.ended.trap(ProcessTerminated)
            self.assertEqual(child.ended.value.signal, signal.SIGKILL)
        self.assertIsNone(self.process.control)
        self.process._gone()  # (its end of file and its exit both say so: once is enough)

    def test_a_signal_before_the_pid_waits_for_it(self):
        child = Child()
        self.process.spawn(self.reactor, "server://k@127.0.0.1:0/127.0.0.1:0", {}, child)
        child.transport.signalProcess(signal.SIGTERM)  # the instance is stopped at once
        self.assertEqual(child.transport.pending, signal.SIGTERM)
        self.theirs.send(json.dumps({"pid": 2 ** 22 + 9}).encode())
        self.process.doRead()  # the pid came: the signal goes (the process is gone: fine)
        self.assertIsNone(child.transport.pending)
        self.theirs.send(json.dumps({"exit": 2 ** 22 + 9, "code": 0, "signal": None}).encode())
        self.process.doRead()
        self.assertTrue(child.transport.exited)
