"""A host process's inside, on a real (not running) ScopedReactor driven step by step:
each instance's code runs in its own scope, logs as itself at its own level, and ends
alone — its descriptors closed, its timers cancelled — however the others fare."""

from __future__ import annotations

import array
import gc
import io
import json
import os
import re
import signal
import socket

from twisted.internet import threads
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from nodepass import logs
from nodepass.master.host import Host
from nodepass.master.hostreactor import ScopedReactor

FAST = {"REPORT_INTERVAL": "1h", "SHUTDOWN_TIMEOUT": "0s"}


def scoped_reactor(case: SynchronousTestCase) -> ScopedReactor:
    reactor = ScopedReactor()

    def dispose() -> None:
        for reader in list(reactor._internalReaders):
            reactor.removeReader(reader)
            reader.connectionLost(None)
        reactor.disconnectAll()
        for call in reactor.getDelayedCalls():
            call.cancel()
        reactor._poller.close()

    case.addCleanup(dispose)
    return reactor


def pump(reactor: ScopedReactor, done, turns: int = 300) -> None:
    """Turn the reactor until ``done()`` (at most ``turns`` turns of ≤ 10 ms)."""
    for _ in range(turns):
        if done():
            return
        reactor.runUntilCurrent()
        reactor.doIteration(0.01)
    raise AssertionError(f"not done after the reactor turned {turns} times")


class Reader:
    """A descriptor that remembers the scope each read ran in."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.scopes: list = []
        self.lost = []

    def fileno(self) -> int:
        return self.sock.fileno() if self.sock.fileno() >= 0 else -1

    def logPrefix(self) -> str:
        return "reader"

    def doRead(self) -> None:
        self.sock.recv(100)
        self.scopes.append(logs.current_scope.get())

    def connectionLost(self, reason) -> None:
        self.lost.append(reason)
        self.sock.close()


class Scopes(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = scoped_reactor(self)
        self.a, self.b = logs.Scope(), logs.Scope()

    def test_a_timer_runs_in_the_scope_it_was_set_in(self):
        seen = []
        self.a.run(self.reactor.callLater, 0, lambda: seen.append(logs.current_scope.get()))
        self.reactor.callLater(0, lambda: seen.append(logs.current_scope.get()))
        self.reactor.runUntilCurrent()
        self.assertEqual(seen, [self.a, None])

    def test_a_descriptor_is_read_in_the_scope_that_watched_it(self):
        ours, theirs = socket.socketpair()
        self.addCleanup(theirs.close)
        reader = Reader(ours)
        self.b.run(self.reactor.addReader, reader)
        self.a.run(self.reactor.addReader, reader)  # (the first to watch it keeps it)
        theirs.send(b"x")
        pump(self.reactor, lambda: reader.scopes)
        self.assertEqual(reader.scopes, [self.b])

    def test_what_the_host_watched_first_stays_the_hosts(self):
        ours, theirs = socket.socketpair()
        self.addCleanup(theirs.close)
        reader = Reader(ours)  # (as the host's socket to the master)
        self.reactor.addReader(reader)
        self.reactor.removeReader(reader)
        self.a.run(self.reactor.addReader, reader)  # (an instance's code writing to it)
        theirs.send(b"x")
        pump(self.reactor, lambda: reader.scopes)
        self.assertEqual(reader.scopes, [None])
        self.assertNotIn(reader, self.a.descriptors)

    def test_an_ended_scope_closes_what_it_stopped_watching_and_survives_a_failing_close(self):
        class Failing(Reader):
            def connectionLost(self, reason):
                super().connectionLost(reason)
                raise RuntimeError("a bug in an instance's protocol")

        pairs = [socket.socketpair() for _ in range(2)]
        for _, theirs in pairs:
            self.addCleanup(theirs.close)
        paused, failing = Reader(pairs[0][0]), Failing(pairs[1][0])
        for reader in (paused, failing):
            self.a.run(self.reactor.addReader, reader)
        self.reactor.removeReader(paused)  # (a paused connection: not watched now)
        self.a.run(self.reactor.callLater, 1, lambda: None)
        self.assertEqual(self.reactor.end_scope(self.a), 3)
        self.assertEqual((len(paused.lost), len(failing.lost)), (1, 1))
        self.assertTrue(self.a.ended)
        self.assertEqual(self.reactor.getDelayedCalls(), [])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_what_an_ending_scope_opens_while_it_is_closed_is_closed_too(self):
        pairs = [socket.socketpair() for _ in range(2)]
        for _, theirs in pairs:
            self.addCleanup(theirs.close)
        reconnected = Reader(pairs[1][0])
        reactor = self.reactor

        class Reconnecting(Reader):
            def connectionLost(self, reason):
                super().connectionLost(reason)
                reactor.addReader(reconnected)  # (in its scope: as a reconnect would)

        self.a.run(self.reactor.addReader, Reconnecting(pairs[0][0]))
        self.reactor.end_scope(self.a)
        self.assertEqual(len(reconnected.lost), 1)
        self.assertNotIn(reconnected, self.reactor.getReaders())

    def test_a_result_from_a_thread_comes_back_in_the_callers_scope(self):
        pool = self.reactor.getThreadPool()
        pool.start()
        self.addCleanup(pool.stop)
        seen = []

        def ask():
            d = threads.deferToThreadPool(self.reactor, pool, logs.current_scope.get)
            d.addCallback(lambda in_thread: seen.append((in_thread,
                                                         logs.current_scope.get())))

        self.a.run(ask)
        pump(self.reactor, lambda: seen)
        self.assertEqual(seen, [(self.a, self.a)])

    def test_ending_a_scope_closes_its_descriptors_and_cancels_its_timers_only(self):
        ran = []
        ours_a, theirs_a = socket.socketpair()
        ours_b, theirs_b = socket.socketpair()
        self.addCleanup(theirs_a.close)
        self.addCleanup(theirs_b.close)
        reader_a, reader_b = Reader(ours_a), Reader(ours_b)
        self.a.run(self.reactor.addReader, reader_a)
        self.b.run(self.reactor.addReader, reader_b)
        self.a.run(self.reactor.callLater, 0, ran.append, "a")
        self.b.run(self.reactor.callLater, 0, ran.append, "b")
        self.assertEqual(self.reactor.end_scope(self.a), 2)
        self.assertEqual(len(reader_a.lost), 1)
        self.assertEqual(reader_b.lost, [])
        self.assertNotIn(reader_a, self.reactor.getReaders())
        self.assertIn(reader_b, self.reactor.getReaders())
        self.reactor.runUntilCurrent()
        self.assertEqual(ran, ["b"])
        self.assertIsNone(self.a.run(ran.append, "late"))  # nothing of it runs again
        self.assertEqual(ran, ["b"])

    def test_the_level_gate_is_the_scopes_own(self):
        self.a.gate.set_level("warn")
        self.b.gate.set_level("debug")
        from twisted.logger import LogLevel

        self.assertFalse(self.a.run(logs.gate.passes, LogLevel.info))
        self.assertTrue(self.b.run(logs.gate.passes, LogLevel.debug))
        self.assertEqual(logs.gate.minimum, logs.gate.process.minimum)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _accept(listener: socket.socket, into: list) -> bool:
    try:
        into.append(listener.accept()[0])
    except BlockingIOError:
        pass
    return bool(into)


def _receive(sock: socket.socket, into: list) -> bool:
    try:
        into.append(sock.recv(100))
    except BlockingIOError:
        pass
    return bool(into)


class Instance:
    """The master's ends of one instance sent to a host."""

    def __init__(self, case: SynchronousTestCase, master_end: socket.socket, number: int,
                 url: str) -> None:
        self.number = number
        pairs = [socket.socketpair() for _ in range(3)]
        (self.status, _), (self.out, _), (self.err, _) = pairs
        for ours, _ in pairs:
            ours.setblocking(False)
            case.addCleanup(ours.close)
        message = json.dumps({"start": number, "url": url, "env": FAST}).encode()
        master_end.sendmsg([message], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                        array.array("i", [t.fileno() for _, t in pairs]))])
        for _, theirs in pairs:
            theirs.close()
        self.records: list[dict] = []
        self.closed = False
        self.errors = b""

    def read(self) -> None:
        for sock, what in ((self.status, "status"), (self.err, "err")):
            while True:
                try:
                    data = sock.recv(65536)
                except BlockingIOError:
                    break
                if not data:
                    self.closed = self.closed or what == "status"
                    break
                if what == "err":
                    self.errors += data
                else:
                    self.records += [json.loads(line) for line in data.splitlines()]

    def said(self, kind: str) -> list[dict]:
        self.read()
        return [r for r in self.records if r["type"] == kind]

    def texts(self) -> str:
        return "\n".join(r["text"] for r in self.said("log"))

    def port(self, what: str) -> int:
        return int(re.search(rf"{what} listening on 127\.0\.0\.1:(\d+)", self.texts()).group(1))


class Hosted(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = scoped_reactor(self)
        self.master_end, host_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.master_end.setblocking(False)
        self.addCleanup(self.master_end.close)
        self.host = Host(self.reactor, host_end)
        self.host.start()
        self.addCleanup(self.host.heartbeat.stop)
        self.addCleanup(self.end_all)
        observer = logs.scoped_observer(io.StringIO())
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        self.messages: list[dict] = []

    def end_all(self) -> None:
        for instance in list(self.host.instances.values()):
            instance.end(sig=signal.SIGKILL)

    def start(self, number: int, url: str) -> Instance:
        return Instance(self, self.master_end, number, url)

    def heard(self) -> list[dict]:
        while True:
            try:
                self.messages.append(json.loads(self.master_end.recv(65536)))
            except BlockingIOError:
                return self.messages

    def exit_of(self, number: int) -> dict | None:
        return next((m for m in self.heard() if m.get("exit") == number), None)

    def test_instances_share_the_host_each_logging_as_itself_at_its_own_level(self):
        loud = self.start(0, "server://k@127.0.0.1:0/127.0.0.1:0?log=debug")
        quiet = self.start(1, "server://k@127.0.0.1:0/127.0.0.1:0?log=warn")
        pump(self.reactor, lambda: loud.said("ready") and quiet.said("ready"))
        self.assertIn("tunnel listening on", loud.texts())
        self.assertEqual(quiet.said("log"), [], "at warn, none of its info lines")
        # what one instance does, on the reactor's later turns, is logged to it alone
        with socket.create_connection(("127.0.0.1", loud.port("target"))):
            pump(self.reactor, lambda: "no client is connected" in loud.texts())
        self.assertEqual(quiet.said("log"), [])
        self.assertIn({"alive": 0}, self.heard())  # (said as the host started)

    def test_a_killed_instance_closes_its_relayed_connections_at_once(self):
        gc.disable()  # (its sockets must be closed by the kill, not by a collection)
        self.addCleanup(gc.enable)
        backend = socket.socket()
        self.addCleanup(backend.close)
        backend.bind(("127.0.0.1", 0))
        backend.listen()
        backend.setblocking(False)
        port = _free_port()
        forwarder = self.start(0, f"client://127.0.0.1:{port}/127.0.0.1:"
                                  f"{backend.getsockname()[1]}?mode=1")
        pump(self.reactor, lambda: forwarder.said("ready"))
        user = socket.create_connection(("127.0.0.1", port))
        self.addCleanup(user.close)
        user.sendall(b"ping")
        accepted: list[socket.socket] = []  # (its target pool dials ahead: which one?)

        found: list[socket.socket] = []

        def relayed() -> bool:
            _accept(backend, accepted)
            for sock in accepted:
                sock.setblocking(False)
                got: list[bytes] = []
                if _receive(sock, got) and got == [b"ping"]:
                    found.append(sock)
            return bool(found)

        pump(self.reactor, relayed)
        for sock in accepted:
            self.addCleanup(sock.close)
        target = found[0]  # relayed: both connections are live
        self.master_end.send(json.dumps({"signal": 0, "sig": signal.SIGKILL}).encode())
        pump(self.reactor, lambda: self.exit_of(0))
        for end in (user, target):
            end.settimeout(5)
            try:
                self.assertEqual(end.recv(10), b"")
            except ConnectionResetError:
                pass  # (aborted: as good as closed)
        self.assertNotIn("the master is gone", forwarder.texts())

    def test_a_killed_instance_lets_go_of_everything_at_once_and_alone(self):
        killed = self.start(0, "server://k@127.0.0.1:0/127.0.0.1:0")
        kept = self.start(1, "server://k@127.0.0.1:0/127.0.0.1:0")
        pump(self.reactor, lambda: killed.said("ready") and kept.said("ready"))
        ports = killed.port("tunnel"), killed.port("target")
        self.master_end.send(json.dumps({"signal": 0, "sig": signal.SIGKILL}).encode())
        pump(self.reactor, lambda: self.exit_of(0))
        self.assertEqual(self.exit_of(0), {"exit": 0, "code": None, "signal": signal.SIGKILL})
        for port in ports:  # its listeners are closed: the port can be taken again now
            with socket.socket() as s:
                s.bind(("127.0.0.1", port))
        pump(self.reactor, lambda: killed.read() or killed.closed)
        self.assertTrue(self.host.instances[1].descriptors)
        self.assertNotIn(0, self.host.instances)
        with socket.create_connection(("127.0.0.1", kept.port("tunnel"))):
            pass  # the other one still listens
        self.master_end.send(json.dumps({"signal": 1, "sig": signal.SIGTERM}).encode())
        pump(self.reactor, lambda: self.exit_of(1))
        self.assertEqual(self.exit_of(1), {"exit": 1, "code": 0, "signal": None})
        self.assertEqual(self.host.instances, {})

    def test_a_fatal_error_ends_that_instance_alone(self):
        taken = socket.socket()
        self.addCleanup(taken.close)
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        kept = self.start(0, "server://k@127.0.0.1:0/127.0.0.1:0")
        tunnel = _free_port()
        failing = self.start(1, f"server://k@127.0.0.1:{tunnel}/127.0.0.1:"
                                f"{taken.getsockname()[1]}?mode=1")
        pump(self.reactor, lambda: self.exit_of(1))
        self.assertEqual(self.exit_of(1)["code"], 1)
        self.assertIn("Address already in use", failing.said("fatal")[0]["message"])
        with socket.socket() as s:  # what it started after the failure was stopped too
            s.bind(("127.0.0.1", tunnel))
        pump(self.reactor, lambda: kept.said("ready"))
        self.assertIn(0, self.host.instances)
        self.assertFalse(self.host.instances[0].ended)

    def test_a_url_that_cannot_be_used_is_a_usage_error_of_that_instance(self):
        bad = self.start(0, "server://k@127.0.0.1:0/127.0.0.1:0?tls=7")
        pump(self.reactor, lambda: self.exit_of(0))
        self.assertEqual(self.exit_of(0), {"exit": 0, "code": 2, "signal": None})
        bad.read()
        self.assertRegex(bad.errors.decode(), r"^nodepass: error: .*tls")
        pump(self.reactor, lambda: bad.read() or bad.closed)

    def test_a_stopping_host_refuses_a_new_instance_and_says_so(self):
        self.host.stop_all()
        self.start(0, "server://k@127.0.0.1:0/127.0.0.1:0")
        pump(self.reactor, lambda: self.exit_of(0))
        self.assertIn({"closing": True}, self.heard())
        self.assertEqual(self.exit_of(0)["refused"], "the host is stopping")
        self.assertEqual(self.host.instances, {})

    def test_a_start_without_its_descriptors_is_refused(self):
        self.master_end.send(json.dumps({"start": 5, "url": "server://k@:0/:0"}).encode())
        pump(self.reactor, lambda: self.exit_of(5))
        self.assertEqual(self.exit_of(5)["code"], 1)
        self.assertEqual(self.host.instances, {})
        os.stat(self.master_end.fileno())  # (the host is still there to be asked)
