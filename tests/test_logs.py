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
