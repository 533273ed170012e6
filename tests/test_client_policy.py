"""The client's reconnect policy: cooldown, doubling, cap, jitter."""

from twisted.trial.unittest import SynchronousTestCase

from nodepass.tunnel.client import reconnect_policy


class ReconnectPolicy(SynchronousTestCase):
    def test_starts_at_the_cooldown_doubles_and_is_capped(self):
        policy = reconnect_policy(5.0, rand=lambda: 0.0)
        self.assertEqual([policy(n) for n in (1, 2, 3, 4, 5, 50)],
                         [5.0, 10.0, 20.0, 40.0, 60.0, 60.0])

    def test_jitter_adds_up_to_a_quarter(self):
        policy = reconnect_policy(4.0, rand=lambda: 1.0)
        self.assertEqual(policy(1), 5.0)
