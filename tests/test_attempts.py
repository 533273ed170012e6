"""The server's limits on key attempts (nodepass/tunnel/attempts.py), on a Clock."""

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from nodepass.tunnel.attempts import Attempts, source_of


class Limits(SynchronousTestCase):
    def test_one_source_gets_a_burst_then_one_attempt_a_second(self):
        clock = Clock()
        attempts = Attempts(clock, per_source=(10, 1.0), overall=(1000, 1000.0))
        self.assertEqual([attempts.admit("192.0.2.1") is None for _ in range(12)],
                         [True] * 10 + [False] * 2)
        self.assertIn("over 1 attempts a second from it", attempts.admit("192.0.2.1"))
        self.assertIsNone(attempts.admit("192.0.2.2"))  # another source is not held back
        clock.advance(1)
        self.assertIsNone(attempts.admit("192.0.2.1"))
        self.assertEqual(attempts.refused, 3)

    def test_failed_attempts_hold_a_source_back_for_a_minute_each(self):
        clock = Clock()
        attempts = Attempts(clock)
        for _ in range(5):
            self.assertIsNone(attempts.admit("192.0.2.1"))
            attempts.failed("192.0.2.1")
        self.assertEqual(attempts.admit("192.0.2.1"),
                         "5 failed attempts from it; one more is allowed every 60s")
        self.assertTrue(attempts.saturated("192.0.2.1"))
        clock.advance(59)
        self.assertIsNotNone(attempts.admit("192.0.2.1"))
        clock.advance(2)
        self.assertIsNone(attempts.admit("192.0.2.1"))

    def test_everyone_together_is_held_to_the_overall_ceiling(self):
        clock = Clock()
        attempts = Attempts(clock, overall=(32, 16.0))
        admitted = sum(attempts.admit(f"198.51.100.{n}") is None for n in range(100))
        self.assertEqual(admitted, 32)
        clock.advance(0.5)
        admitted = sum(attempts.admit(f"203.0.113.{n}") is None for n in range(100))
        self.assertEqual(admitted, 8)

    def test_an_ipv6_host_is_its_64_and_a_mapped_ipv4_its_address(self):
        self.assertEqual(source_of("2001:db8:1:2:aaaa::1"), source_of("2001:db8:1:2::ffff"))
        self.assertNotEqual(source_of("2001:db8:1:2::1"), source_of("2001:db8:1:3::1"))
        self.assertEqual(source_of("::ffff:192.0.2.7"), "192.0.2.7")
        self.assertEqual(source_of("192.0.2.7"), "192.0.2.7")

    def test_the_table_of_sources_stays_bounded(self):
        attempts = Attempts(Clock(), max_sources=100)
        for n in range(1000):
            attempts.admit(f"10.0.{n // 250}.{n % 250}")
        self.assertLessEqual(len(attempts.sources), 100)
