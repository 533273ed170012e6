"""The one backoff: the client's reconnects and the master's restarts."""

from twisted.trial.unittest import SynchronousTestCase

from nodepass.backoff import backoff


class Backoff(SynchronousTestCase):
    def test_starts_at_the_cooldown_doubles_and_is_capped(self):
        delay = backoff(5.0)
        self.assertEqual([delay(n) for n in (1, 2, 3, 4, 5, 50, 10**6)],
                         [5.0, 10.0, 20.0, 40.0, 60.0, 60.0, 60.0])

    def test_jitter_adds_up_to_its_share(self):
        self.assertEqual(backoff(4.0, 0.25, rand=lambda: 1.0)(1), 5.0)
        self.assertEqual(backoff(4.0, 0.25, rand=lambda: 0.0)(2), 8.0)

    def test_a_zero_cooldown_never_waits(self):
        self.assertEqual(backoff(0.0)(7), 0.0)
