"""An instance's structured channel to its master: reports, and its log as records."""

import json
import socket

from twisted.internet.task import Clock
from twisted.logger import LogLevel
from twisted.trial.unittest import SynchronousTestCase

from nodepass.statuschannel import StatusChannel


class LogRecords(SynchronousTestCase):
    def setUp(self):
        self.ours, self.masters = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.ours.setblocking(False)
        self.addCleanup(self.ours.close)
        self.addCleanup(self.masters.close)
        self.channel = StatusChannel(Clock(), self.ours.fileno(), lambda: None, 1.0,
                                     lambda: None)

    def records(self):
        self.masters.setblocking(False)
        data = b""
        while True:
            try:
                chunk = self.masters.recv(1 << 20)
            except BlockingIOError:
                break
            if not chunk:
                break
            data += chunk
        return [json.loads(line) for line in data.splitlines()]

    def event(self, text, level=LogLevel.info):
        return {"log_format": "{text}", "text": text, "log_level": level, "log_time": 0.0,
                "log_namespace": "nodepass"}

    def test_each_event_is_one_record_with_its_level_text_and_line(self):
        self.channel.log_record(self.event("tunnel listening on 127.0.0.1:1"))
        self.channel.log_record(self.event("cannot listen", LogLevel.critical))
        first, second = self.records()
        self.assertEqual((first["type"], first["level"], first["text"]),
                         ("log", "INFO", "tunnel listening on 127.0.0.1:1"))
        self.assertEqual(first["line"], "1970-01-01 00:00:00.000  INFO   tunnel listening on "
                                        "127.0.0.1:1")
        self.assertEqual((second["level"], second["text"]), ("FATAL", "cannot listen"))

    def test_a_master_that_does_not_read_loses_lines_never_waits_and_hears_how_many(self):
        self.ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        for n in range(2000):  # far more than the socket holds
            self.channel.log_record(self.event(f"line {n} " + "x" * 200))
        self.assertGreater(self.channel.dropped_logs, 0)
        dropped = self.channel.dropped_logs
        received = self.records()
        self.assertTrue(all(r["text"].startswith("line ") for r in received))
        self.channel.log_record(self.event("after"))
        notice, after = self.records()[-2:]
        self.assertEqual((notice["level"], notice["text"]),
                         ("WARN", f"{dropped} log lines were dropped (the master was not "
                                  "reading)"))
        self.assertEqual(after["text"], "after")

    def test_a_record_too_long_is_cut_not_lost(self):
        self.channel.log_record(self.event("y" * 10_000))
        (record,) = self.records()
        self.assertEqual(len(record["text"]), 1800)



class Reports(SynchronousTestCase):
    def test_instances_started_apart_report_together_on_multiples_of_the_interval(self):
        from twisted.internet.testing import MemoryReactorClock

        class Report:
            def as_dict(self):
                return {}

        reactor = MemoryReactorClock()
        reported = []
        channels = []
        for name, start in (("a", 0.3), ("b", 2.7)):
            reactor.advance(start - reactor.seconds())
            ours, theirs = socket.socketpair()
            self.addCleanup(theirs.close)
            channel = StatusChannel(reactor, ours.detach(), lambda name=name: (
                reported.append((name, reactor.seconds())), Report())[1], 5.0, lambda: None)
            channel.startService()
            channels.append(channel)
        reactor.advance(5.0 - reactor.seconds())
        reactor.advance(5.0)
        self.assertEqual(reported, [("a", 5.0), ("b", 5.0), ("a", 10.0), ("b", 10.0)])
        for channel in channels:
            channel.stopService()  # (each reports once more as it stops)
        self.assertEqual(reactor.getDelayedCalls(), [])

    def test_its_descriptor_is_closed_even_when_the_last_report_fails(self):
        from twisted.internet.testing import MemoryReactorClock

        ours, theirs = socket.socketpair()
        self.addCleanup(theirs.close)

        def broken():
            raise RuntimeError("a bug in a snapshot")

        channel = StatusChannel(MemoryReactorClock(), ours.detach(), broken, 5.0,
                                lambda: None)
        self.assertRaises(RuntimeError, channel.stopService)
        theirs.settimeout(5)
        self.assertEqual(theirs.recv(10), b"")  # the master hears the end (its only copy)

    def test_nothing_is_written_once_stopped_even_to_a_reused_descriptor_number(self):
        from twisted.internet.testing import MemoryReactorClock

        ours, theirs = socket.socketpair()
        self.addCleanup(theirs.close)
        number = ours.detach()
        channel = StatusChannel(MemoryReactorClock(), number, lambda: None, 5.0,
                                lambda: None)
        channel.report = lambda: None
        channel.stopService()
        reused = None
        for _ in range(10):  # the lowest free number comes back: wait for ours
            a, b = socket.socketpair()
            self.addCleanup(a.close)
            self.addCleanup(b.close)
            if a.fileno() == number:
                reused = b
                break
        self.assertIsNotNone(reused, "the descriptor number was not reused")
        channel.log_record({"log_format": "late", "log_level": LogLevel.info,
                            "log_time": 0.0})
        channel.send(type="report")
        reused.setblocking(False)
        self.assertRaises(BlockingIOError, reused.recv, 100)
