"""The master's side of the fork server and of its hosts, in memory: messages queue
while the other end does not read and go out in order; a fork server that dies ends
its hosts; instances are spread over hosts and a host that ends takes only its own
instances with it; the watchdog kills a silent host."""

from __future__ import annotations

import json
import os
import signal
import socket

from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.testing import MemoryReactor, MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from nodepass.master.forkserver import Forked, _ForkServerProcess
from nodepass.master.hosts import (
    CHECK_EVERY,
    Host,
    HostPool,
    HostSettings,
    host_settings,
)
from nodepass.master.packets import MAX_MESSAGE, PacketChannel, receive
from nodepass.master.supervisor import ChildProcess

_real_pidfd_open = os.pidfd_open
_real_kill = Host.kill


def _read_all(sock: socket.socket) -> list[tuple[dict, int]]:
    """Every message waiting on the other end: (message, descriptors attached)."""
    got = []
    while True:
        try:
            data, fds = receive(sock)
        except BlockingIOError:
            return got
        for fd in fds:
            os.close(fd)
        got.append((json.loads(data), len(fds)))


def _pair(case: SynchronousTestCase) -> tuple[socket.socket, socket.socket]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    theirs.setblocking(False)
    case.addCleanup(theirs.close)
    case.addCleanup(ours.close)
    return ours, theirs


class Packets(SynchronousTestCase):
    def test_messages_wait_while_the_other_end_is_not_reading(self):
        reactor = MemoryReactor()
        ours, theirs = _pair(self)
        channel = PacketChannel(reactor, ours, "test", lambda m, fds: None, lambda: None)
        sent = []
        for n in range(300):
            attached = socket.socketpair()
            attached[1].close()
            channel.send({"n": n, "pad": "x" * 1500}, [attached[0]],
                         lambda n=n: sent.append(n))
        self.assertTrue(channel.outgoing)  # its socket is full: the rest waits
        self.assertIn(channel, reactor.getWriters())
        got = []
        while channel.outgoing:
            got += _read_all(theirs)
            channel.doWrite()
        got += _read_all(theirs)
        self.assertEqual([m["n"] for m, _ in got], list(range(300)))
        self.assertEqual({fds for _, fds in got}, {1})
        self.assertEqual(sent, list(range(300)))
        self.assertNotIn(channel, reactor.getWriters())

    def test_a_malformed_message_is_ignored_and_the_next_handled(self):
        reactor = MemoryReactor()
        ours, theirs = _pair(self)
        got = []
        PacketChannel(reactor, ours, "test", lambda m, fds: got.append(m), lambda: None)
        for data in (b"not json", b"[1]", b"[" * 100_000, b'{"ok": 1}'):
            theirs.send(data)
        reactor.getReaders()[0].doRead()
        self.assertEqual(got, [{"ok": 1}])

    def test_a_message_too_long_is_refused_and_the_channel_goes_on(self):
        reactor = MemoryReactor()
        ours, theirs = _pair(self)
        channel = PacketChannel(reactor, ours, "test", lambda m, fds: None, lambda: None)
        self.assertRaises(OSError, channel.send, {"url": "x" * MAX_MESSAGE})
        channel.send({"next": 1})
        self.assertEqual(_read_all(theirs), [({"next": 1}, 0)])

    def test_the_other_end_closing_closes_the_channel_once(self):
        reactor = MemoryReactor()
        ours, theirs = _pair(self)
        closed = []
        channel = PacketChannel(reactor, ours, "test", lambda m, fds: None,
                                lambda: closed.append(1))
        theirs.close()
        channel.doRead()
        channel.close()
        self.assertEqual(closed, [1])
        self.assertRaises(OSError, channel.send, {"late": 1})


class ForkServerGone(SynchronousTestCase):
    def test_a_dead_fork_server_ends_every_host_it_had(self):
        process = _ForkServerProcess(MemoryReactor(), {})
        ours, theirs = _pair(self)
        process.channel = PacketChannel(process.reactor, ours, "forkserver",
                                        process._message, process._closed)
        ends = []

        def record(name):
            return Forked(lambda pid: None, lambda code, sig: ends.append((name, code, sig)))

        for name in ("forked", "sent"):
            process.fork([socket.socket()], record(name))
        _read_all(theirs)
        theirs.send(json.dumps({"pid": 2 ** 22 + 7}).encode())  # no such process
        process.channel.doRead()
        self.assertEqual(set(process.hosts), {2 ** 22 + 7})
        process.channel.outgoing.append((b"{}", [], lambda: process.waiting.append(
            record("unsent"))))  # (as if the socket were full)
        process._gone()
        self.assertEqual(sorted(ends), [("forked", None, signal.SIGKILL),
                                        ("sent", None, signal.SIGKILL),
                                        ("unsent", None, signal.SIGKILL)])
        self.assertIsNone(process.channel)
        process._gone()  # (its end of file and its exit both say so: once is enough)
        self.assertEqual(len(ends), 3)


class FakeForkServer:
    """Takes fork requests; the test plays each host's end."""

    def __init__(self, case: SynchronousTestCase) -> None:
        self.case = case
        self.requests: list[tuple[socket.socket, Forked]] = []
        self.running = False

    def start(self) -> None:
        self.running = True

    def stop(self) -> None:
        self.running = False

    def fork(self, ends: list[socket.socket], forked: Forked) -> None:
        host_end, output = ends
        output.close()
        host_end.setblocking(False)
        self.case.addCleanup(host_end.close)
        self.requests.append((host_end, forked))


def _child(name: str, ended: dict) -> ChildProcess:
    child = ChildProcess(name, lambda event: None,
                         lambda code, sig, tail: ended.__setitem__(name, (code, sig)))
    return child


def _no_pidfd(pid: int) -> int:
    raise ProcessLookupError(pid)


class Pool(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.forks = FakeForkServer(self)
        self.pool = HostPool(self.reactor, self.forks, HostSettings(size=3, spread=2,
                                                                    watchdog=3.0))
        self.ended: dict = {}
        self.killed: list[Host] = []
        self.patch(Host, "kill", lambda host: self.killed.append(host))
        self.patch(os, "pidfd_open", _no_pidfd)  # (the pids here are made up)

    def spawn(self, name: str, alone: bool = False) -> ChildProcess:
        child = _child(name, self.ended)
        child.alone = alone
        self.pool.spawn(self.reactor, f"server://k@127.0.0.1:0/127.0.0.1:0#{name}", {}, child)
        return child

    def host_of(self, child: ChildProcess) -> Host:
        return child.transport.host

    def test_instances_spread_over_hosts_then_share_them_up_to_the_size(self):
        children = [self.spawn(f"i{n}") for n in range(6)]
        hosts = [self.host_of(c) for c in children]
        # a host each until there are `spread` of them, then the one with most room
        self.assertEqual(len(set(hosts[:2])), 2)
        self.assertEqual({len(h.instances) for h in self.pool.hosts}, {3})
        self.assertEqual(len(self.pool.hosts), 2)
        seventh = self.spawn("i6")  # all full: a new host
        self.assertEqual(len(self.pool.hosts), 3)
        self.assertNotIn(self.host_of(seventh), hosts)
        alone = self.spawn("lone", alone=True)
        self.assertEqual(self.host_of(alone).capacity, 1)
        self.assertEqual(len(self.host_of(self.spawn("i7")).instances), 2)  # not with it

    def test_each_instance_gets_its_url_and_three_descriptors_in_its_host(self):
        child = self.spawn("one")
        host_end, forked = self.forks.requests[0]
        forked.forked(4242)
        self.assertEqual(child.pid, 4242)
        ((message, fds),) = _read_all(host_end)
        self.assertEqual(message["url"], "server://k@127.0.0.1:0/127.0.0.1:0#one")
        self.assertEqual(fds, 3)
        child.transport.signalProcess(signal.SIGTERM)
        self.assertEqual(_read_all(host_end), [({"signal": message["start"],
                                                 "sig": signal.SIGTERM}, 0)])

    def test_a_host_that_ends_takes_only_its_own_instances(self):
        a, b = self.spawn("a"), self.spawn("b")
        c = self.spawn("c")  # shares a's or b's host
        doomed = self.host_of(c)
        (survivor,) = {self.host_of(a), self.host_of(b)} - {doomed}
        doomed._exited(None, signal.SIGSEGV)
        for child in (a, b, c):
            child.channel_closed()  # (the host's end of each status channel went with it)
        lost = {name for name, (_, sig) in self.ended.items() if sig == signal.SIGSEGV}
        self.assertEqual(lost, {c.instance_id, *[x.instance_id for x in (a, b)
                                                 if self.host_of(x) is doomed]})
        for child in (a, b, c):
            self.assertEqual(child.host_lost, self.host_of(child) is doomed)
        self.assertNotIn(doomed, self.pool.hosts)
        self.assertIn(survivor, self.pool.hosts)

    def test_an_instance_ends_as_its_host_says_and_an_empty_host_is_retired(self):
        child = self.spawn("one")
        host = self.host_of(child)
        host_end, _ = self.forks.requests[0]
        number = _read_all(host_end)[0][0]["start"]
        host_end.send(json.dumps({"exit": number, "code": 0, "signal": None}).encode())
        host.channel.doRead()
        child.channel_closed()
        self.assertEqual(self.ended, {"one": (0, None)})
        self.assertFalse(child.host_lost)
        self.assertTrue(host.retired)
        self.assertIsNone(host.channel.sock)  # its end closed: the host exits
        self.assertNotIn(host, self.pool.hosts)

    def test_the_watchdog_kills_a_host_that_stops_saying_it_is_alive(self):
        self.pool.start()
        quiet, talking = self.host_of(self.spawn("quiet")), self.host_of(self.spawn("talks"))
        for n, (_, forked) in enumerate(self.forks.requests):
            forked.forked(1000 + n)
        talking_end = next(end for end, f in self.forks.requests
                           if f.exited == talking._exited)
        for _ in range(6):
            talking_end.send(json.dumps({"alive": 1}).encode())  # (read by the watchdog)
            self.reactor.advance(CHECK_EVERY)
        self.assertEqual(self.killed, [quiet])
        self.reactor.advance(10 * CHECK_EVERY)
        self.assertEqual(self.killed, [quiet, talking], "killed once each")
        self.pool.stop()

    def test_a_going_host_takes_no_new_instance(self):
        first = self.spawn("first")
        going = self.host_of(first)
        going.channel.close()  # (its end of file read: its exit is yet to be reported)
        self.assertEqual(self.killed, [going])  # (made sure of)
        self.assertIsNot(self.host_of(self.spawn("second")), going)
        self.assertNotIn(going, self.pool.hosts)

    def test_an_instance_alone_in_its_host_ends_as_itself(self):
        quarantined, first = self.spawn("quarantined", alone=True), self.spawn("first")
        self.assertEqual(self.host_of(first).capacity, 3)  # (room for more, just one yet)
        for child in (quarantined, first):
            self.host_of(child)._exited(None, signal.SIGSEGV)
            child.channel_closed()
            self.assertFalse(child.host_lost)  # (its own crash: its restart policy decides)
        self.assertEqual(self.ended, {"quarantined": (None, signal.SIGSEGV),
                                      "first": (None, signal.SIGSEGV)})

    def test_what_a_host_said_before_it_ended_is_heard_first(self):
        a, b = self.spawn("a"), self.spawn("b")
        c = self.spawn("c")  # (shares a's or b's host)
        host = self.host_of(c)
        end = next(e for e, f in self.forks.requests if f.exited == host._exited)
        for message in _read_all(end):  # SIGTERM to the host: it stopped them, then exited
            end.send(json.dumps({"exit": message[0]["start"], "code": 0,
                                 "signal": None}).encode())
        host._exited(0, None)  # (its exit heard before its socket was read)
        for child in (a, b, c):
            child.channel_closed()
        mine = [x for x in (a, b, c) if self.host_of(x) is host]
        self.assertEqual(len(mine), 2)
        self.assertEqual({x.instance_id: self.ended[x.instance_id] for x in mine},
                         {x.instance_id: (0, None) for x in mine})
        self.assertFalse(any(x.host_lost for x in mine))

    def test_a_stopping_host_takes_no_new_instance_and_one_it_refused_comes_back(self):
        first = self.spawn("first")
        self.spawn("second")
        stopping = self.host_of(first)
        end = next(e for e, f in self.forks.requests if f.exited == stopping._exited)
        number = _read_all(end)[0][0]["start"]
        end.send(json.dumps({"closing": True}).encode())
        end.send(json.dumps({"exit": number, "code": 1, "signal": None,
                             "refused": "the host is stopping"}).encode())
        stopping.channel.doRead()
        first.channel_closed()
        self.assertTrue(first.host_lost)  # (so it is started again, elsewhere)
        self.assertFalse(stopping.usable)
        self.assertIsNot(self.host_of(self.spawn("third")), stopping)

    def test_a_retired_host_that_does_not_exit_is_killed(self):
        child = self.spawn("one")
        host = self.host_of(child)
        self.forks.requests[0][1].forked(4242)
        host.retire()
        self.reactor.advance(9)
        self.assertEqual(self.killed, [])
        self.reactor.advance(2)
        self.assertEqual(self.killed, [host])

    def test_a_host_is_killed_through_its_pidfd(self):
        import subprocess

        self.patch(os, "pidfd_open", _real_pidfd_open)
        self.patch(Host, "kill", _real_kill)
        process = subprocess.Popen(["sleep", "30"])
        self.addCleanup(process.wait, 5)
        self.addCleanup(lambda: process.poll() is None and process.kill())
        child = self.spawn("one")
        self.forks.requests[0][1].forked(process.pid)
        self.assertIsNotNone(self.host_of(child).pidfd)
        self.host_of(child).kill()
        self.assertEqual(process.wait(5), -signal.SIGKILL)

    def test_a_host_process_ending_reads_as_a_process_ending(self):
        child = self.spawn("one")
        self.host_of(child)._exited(0, None)
        child.channel_closed()
        self.assertEqual(self.ended, {"one": (1, None)})  # it did not stop on its own

    def test_process_done_for_a_clean_exit(self):
        from nodepass.master.hosts import ended

        ended(0, None).trap(ProcessDone)
        self.assertEqual(ended(None, signal.SIGKILL).trap(ProcessTerminated),
                         ProcessTerminated)


class Settings(SynchronousTestCase):
    def test_defaults(self):
        settings = host_settings({})
        self.assertEqual((settings.size, settings.watchdog), (16, 5.0))
        self.assertEqual(settings.spread, os.cpu_count() or 1)

    def test_bad_values_are_named_with_what_is_allowed(self):
        for name, value, words in (
            ("NODEPASS_HOST_SIZE", "0", "expected a whole number from 1"),
            ("NODEPASS_HOST_SIZE", "many", "expected a whole number from 1"),
            ("NODEPASS_HOST_SPREAD", "-1", "expected a whole number from 1"),
            ("NODEPASS_HOST_WATCHDOG", "1s", "at least 2s"),
            ("NODEPASS_HOST_WATCHDOG", "soon", "at least 2s"),
        ):
            with self.assertRaises(ValueError) as raised:
                host_settings({name: value})
            self.assertIn(f"{name}={value!r}", str(raised.exception))
            self.assertIn(words, str(raised.exception))
