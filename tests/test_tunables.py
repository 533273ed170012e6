"""Environment tunables: every one, good and bad."""

from dataclasses import fields

from twisted.trial.unittest import SynchronousTestCase

from nodepass.tunables import (
    _SPECS,
    TunableError,
    Tunables,
    environment_names,
    from_environ,
    parse_duration,
)


class Durations(SynchronousTestCase):
    def test_go_syntax(self):
        table = {"0": 0.0, "500ms": 0.5, "5s": 5.0, "1h": 3600.0, "1h30m": 5400.0,
                 "1.5s": 1.5, "100us": 1e-4, "100µs": 1e-4, "2m3s": 123.0, ".5s": 0.5,
                 "10ns": 1e-8}
        for text, seconds in table.items():
            self.assertAlmostEqual(parse_duration(text), seconds, msg=text)

    def test_refused(self):
        for text in ("", "5", "s", "5 s", "-1s", "1d", "1h30", "abc", "1.2.3s", "0x10s"):
            with self.assertRaises(ValueError, msg=text):
                parse_duration(text)


class FromEnviron(SynchronousTestCase):
    def test_defaults_are_nodepass(self):
        self.assertEqual(from_environ({}), Tunables(
            semaphore_limit=1024, min_pool_capacity=16, max_pool_capacity=1024,
            min_pool_interval=1.0, max_pool_interval=5.0, udp_data_buf_size=8192,
            udp_read_timeout=5.0, report_interval=5.0, reload_interval=3600.0,
            service_cooldown=5.0, shutdown_timeout=5.0, udp_answer_timeout=2.0,
            udp_max_sessions=0, udp_max_per_source=32))

    def test_every_tunable_is_read(self):
        good = {
            "SEMAPHORE_LIMIT": ("10", 10), "MIN_POOL_CAPACITY": ("2", 2),
            "MAX_POOL_CAPACITY": ("64", 64), "MIN_POOL_INTERVAL": ("100ms", 0.1),
            "MAX_POOL_INTERVAL": ("1h", 3600.0), "UDP_DATA_BUF_SIZE": ("65535", 65535),
            "UDP_READ_TIMEOUT": ("1m", 60.0), "REPORT_INTERVAL": ("250ms", 0.25),
            "RELOAD_INTERVAL": ("1h30m", 5400.0), "SERVICE_COOLDOWN": ("0", 0.0),
            "SHUTDOWN_TIMEOUT": ("2s", 2.0), "UDP_ANSWER_TIMEOUT": ("500ms", 0.5),
            "UDP_MAX_SESSIONS": ("100", 100), "UDP_MAX_PER_SOURCE": ("4", 4),
            "FLEET_HEARTBEAT": ("250ms", 0.25), "FLEET_COMMAND_WAIT": ("1m", 60.0),
        }
        self.assertEqual(sorted(good), sorted(environment_names()))
        tunables = from_environ({name: text for name, (text, _) in good.items()})
        for name, (_, value) in good.items():
            self.assertEqual(getattr(tunables, name.lower()), value, name)

    def test_np_prefix_is_an_alias(self):
        self.assertEqual(from_environ({"NP_SEMAPHORE_LIMIT": "7"}).semaphore_limit, 7)
        self.assertEqual(
            from_environ({"NP_SEMAPHORE_LIMIT": "7", "SEMAPHORE_LIMIT": "7"}).semaphore_limit, 7)

    def test_disagreeing_alias_refused(self):
        with self.assertRaises(TunableError) as caught:
            from_environ({"NP_SEMAPHORE_LIMIT": "7", "SEMAPHORE_LIMIT": "8"})
        self.assertIn("SEMAPHORE_LIMIT='8' and NP_SEMAPHORE_LIMIT='7' disagree",
                      str(caught.exception))

    def test_every_bad_value_names_the_variable(self):
        bad = {
            "SEMAPHORE_LIMIT": ["0", "-1", "ten", "1.5", "", "1_000"],
            "MIN_POOL_CAPACITY": ["0", "x"],
            "MAX_POOL_CAPACITY": ["0", "x"],
            "MIN_POOL_INTERVAL": ["0", "1", "fast"],
            "MAX_POOL_INTERVAL": ["0", "5"],
            "UDP_DATA_BUF_SIZE": ["0", "65536", "8k"],
            "UDP_READ_TIMEOUT": ["0", "5"],
            "REPORT_INTERVAL": ["0", "5"],
            "RELOAD_INTERVAL": ["0", "1day"],
            "SERVICE_COOLDOWN": ["-1s", "5"],
            "SHUTDOWN_TIMEOUT": ["-5s", "soon"],
            "UDP_ANSWER_TIMEOUT": ["0", "2"],
            "UDP_MAX_SESSIONS": ["-1", "half"],
            "UDP_MAX_PER_SOURCE": ["0", "x"],
            "FLEET_HEARTBEAT": ["0", "50ms", "2h"],
            "FLEET_COMMAND_WAIT": ["500ms", "11m", "x"],
        }
        self.assertEqual(sorted(bad), sorted(environment_names()))
        for name, values in bad.items():
            for text in values:
                with self.assertRaises(TunableError, msg=f"{name}={text}") as caught:
                    from_environ({name: text})
                message = str(caught.exception)
                self.assertTrue(message.startswith(f"{name}={text!r} "), message)
                self.assertIn("allowed" if "range" in message else "is not", message)

    def test_min_greater_than_max_is_an_error_not_a_swap(self):
        with self.assertRaises(TunableError) as caught:
            from_environ({"MIN_POOL_CAPACITY": "100", "MAX_POOL_CAPACITY": "10"})
        self.assertIn("MIN_POOL_CAPACITY (100) is greater than MAX_POOL_CAPACITY (10)",
                      str(caught.exception))
        with self.assertRaises(TunableError) as caught:
            from_environ({"MIN_POOL_INTERVAL": "5s", "MAX_POOL_INTERVAL": "500ms"})
        self.assertIn("MIN_POOL_INTERVAL (5s) is greater than MAX_POOL_INTERVAL (500ms)",
                      str(caught.exception))

    def test_every_field_has_a_reader(self):
        self.assertEqual(sorted(f.name for f in fields(Tunables)), sorted(_SPECS))
