"""Log lines: level filter, format, UTC timestamps."""

import io

from twisted.logger import LogLevel, LogPublisher
from twisted.trial.unittest import SynchronousTestCase

from nodepass.logs import LevelGate, format_line, line_observer


class Format(SynchronousTestCase):
    def test_line_shape(self):
        event = {"log_time": 1744539915.1234, "log_level": LogLevel.warn,
                 "log_format": "pool {size}", "size": 3}
        self.assertEqual(format_line(event), "2025-04-13 10:25:15.123  WARN   pool 3")

    def test_fatal_label_and_instance(self):
        event = {"log_time": 0, "log_level": LogLevel.critical, "log_format": "x",
                 "instance_id": "ins_1"}
        self.assertEqual(format_line(event), "1970-01-01 00:00:00.000  FATAL  [ins_1] x")

    def test_one_line_even_for_multiline_messages(self):
        event = {"log_time": 0, "log_level": LogLevel.info, "log_format": "a\nb"}
        self.assertEqual(format_line(event).count("\n"), 0)


class Gate(SynchronousTestCase):
    def emit_all(self, level):
        stream = io.StringIO()
        gate = LevelGate(level)
        publisher = LogPublisher()
        from twisted.logger import FilteringLogObserver
        publisher.addObserver(FilteringLogObserver(line_observer(stream), [gate]))
        for lvl in (LogLevel.debug, LogLevel.info, LogLevel.warn, LogLevel.error,
                    LogLevel.critical):
            publisher({"log_time": 0, "log_level": lvl, "log_format": lvl.name})
        return [line.split()[-1] for line in stream.getvalue().splitlines()]

    def test_levels_filter(self):
        self.assertEqual(self.emit_all("debug"), ["debug", "info", "warn", "error", "critical"])
        self.assertEqual(self.emit_all("info"), ["info", "warn", "error", "critical"])
        self.assertEqual(self.emit_all("warn"), ["warn", "error", "critical"])
        self.assertEqual(self.emit_all("error"), ["error", "critical"])
        self.assertEqual(self.emit_all("fatal"), ["critical"])
        self.assertEqual(self.emit_all("none"), [])


class PeerStrings(SynchronousTestCase):
    """What a peer chooses (an address in a LAUNCH, a name, a request line) cannot
    rewrite a log line, forge another or drive the operator's terminal."""

    HOSTILE = "203.0.113.9:1\r\x1b[2J\x1b[31mFATAL forged\nline\x85"
    ESCAPED = "203.0.113.9:1\\r\\x1b[2J\\x1b[31mFATAL forged\\nline\\x85"

    def test_fields_are_escaped_before_any_observer_sees_them(self):
        from twisted.logger import capturedLogs

        from nodepass import logs

        with capturedLogs() as events:  # the global publisher: twistd's log file sees this
            logs.logger("nodepass").warn("launch from {source}", source=self.HOSTILE)
        (event,) = events
        self.assertEqual(event["source"], self.ESCAPED)
        line = format_line(event)
        self.assertTrue(line.endswith(f"launch from {self.ESCAPED}"), line)
        self.assertEqual(line.count("\n") + line.count("\r") + line.count("\x1b"), 0)

    def test_a_launch_from_the_peer_is_logged_escaped(self):
        from twisted.logger import capturedLogs

        from nodepass import logs
        from nodepass.tunnel.wire import Proto
        from tests.memory import add_data, open_session, server_tunnel

        tunnel, _ = server_tunnel(controls={"mode": 2})
        data = add_data(tunnel, open_session(tunnel), 46001)
        logs.gate.set_level("debug")
        self.addCleanup(logs.gate.set_level, "info")
        with capturedLogs() as events:
            data.send(data.launch(Proto.TCP, "203.0.113.9:1\r\x1b[2J\x1b[31mFATAL\nforged"))
        lines = [format_line(e) for e in events]
        launch = [line for line in lines if "launch from" in line]
        self.assertEqual(len(launch), 1, lines)
        self.assertIn("launch from 203.0.113.9:1\\r\\x1b[2J\\x1b[31mFATAL\\nforged", launch[0])
        self.assertFalse(any(c in line for line in lines for c in "\r\n\x1b"), lines)
