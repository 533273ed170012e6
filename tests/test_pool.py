"""The pools, on a Clock: growth under demand, shrink when idle, bounds, stale entries."""

from twisted.internet.defer import Deferred, fail
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from nodepass.tunnel.pool import MAX_DIALING, ClientPool, IdlePool


class Conn:
    def __init__(self):
        self.closed = False

    def close(self):
        self.closed = True


class Dialer:
    """Dials complete when the test says so."""

    def __init__(self):
        self.pending: list[Deferred] = []

    def __call__(self):
        d = Deferred()
        self.pending.append(d)
        return d

    def complete_all(self):
        conns = []
        while self.pending:
            conn = Conn()
            conns.append(conn)
            self.pending.pop(0).callback(conn)
        return conns


def client_pool(min_capacity=4, max_capacity=32, min_interval=1.0, max_interval=3.0):
    clock, dialer = Clock(), Dialer()
    pool = ClientPool(clock, dialer, min_capacity, max_capacity, min_interval, max_interval)
    return pool, clock, dialer


class ClientPoolTests(SynchronousTestCase):
    def test_start_fills_to_minimum_capacity(self):
        pool, _, dialer = client_pool()
        pool.start()
        self.assertEqual(len(dialer.pending), 4)
        dialer.complete_all()
        self.assertEqual(len(pool.idle), 4)

    def test_taken_connection_is_replaced_at_once_and_never_reused(self):
        pool, _, dialer = client_pool()
        pool.start()
        first = dialer.complete_all()
        pool.taken(first[0])
        self.assertNotIn(first[0], pool.idle)
        self.assertEqual(len(dialer.pending), 1)
        (replacement,) = dialer.complete_all()
        self.assertIn(replacement, pool.idle)
        self.assertNotIn(first[0], pool.idle)

    def test_capacity_grows_under_demand_up_to_the_maximum(self):
        pool, clock, dialer = client_pool(max_capacity=20)
        pool.start()
        capacities = []
        for _ in range(5):
            for _ in range(pool.capacity):  # a whole capacity is used in every round
                dialer.complete_all()
                pool.taken(pool.idle[0])
            dialer.complete_all()
            clock.advance(pool.interval)
            capacities.append(pool.capacity)
        self.assertEqual(capacities, [8, 16, 20, 20, 20])

    def test_capacity_shrinks_when_idle_down_to_the_minimum(self):
        pool, clock, dialer = client_pool(min_capacity=4, max_capacity=32)
        pool.capacity = 32
        pool.start()
        dialer.complete_all()
        capacities = []
        for _ in range(20):
            clock.advance(pool.interval)
            dialer.complete_all()
            capacities.append(pool.capacity)
        self.assertEqual(capacities[:3], [28, 25, 22])
        self.assertEqual(capacities[-1], 4)
        self.assertEqual(len(pool.idle), 4)

    def test_surplus_idle_connections_are_closed_on_shrink(self):
        pool, clock, dialer = client_pool(min_capacity=4)
        pool.capacity = 16
        pool.start()
        conns = dialer.complete_all()
        clock.advance(pool.interval)
        self.assertEqual(pool.capacity, 14)
        self.assertEqual(sum(c.closed for c in conns), 2)
        self.assertEqual(len(pool.idle), 14)

    def test_interval_moves_within_bounds(self):
        pool, clock, dialer = client_pool(min_interval=1.0, max_interval=1.3)
        pool.start()
        dialer.complete_all()  # idle share 100 % -> interval grows
        intervals = []
        for _ in range(5):
            clock.advance(pool.interval)
            dialer.complete_all()
            intervals.append(round(pool.interval, 3))
        self.assertEqual(intervals, [1.1, 1.2, 1.3, 1.3, 1.3])
        for conn in list(pool.idle):  # drained -> interval shrinks
            pool.taken(conn)
        clock.advance(pool.interval)
        self.assertEqual(round(pool.interval, 3), 1.2)

    def test_demand_puts_that_many_connections_in_flight(self):
        pool, _, dialer = client_pool(max_capacity=50)
        pool.start()
        dialer.complete_all()
        pool.demand(10)
        self.assertEqual(len(dialer.pending), 10)
        pool.demand(12)  # 10 already in flight
        self.assertEqual(len(dialer.pending), 12)
        pool.demand(500)  # bounded by the maximum, and dialed MAX_DIALING at a time
        self.assertEqual((len(dialer.pending), pool.queued), (MAX_DIALING, 50 - MAX_DIALING))
        self.assertEqual(len(dialer.complete_all()), 50)
        self.assertEqual((pool.opening, pool.queued, len(pool.idle)), (0, 0, 50))  # its max

    def test_at_most_max_dialing_are_opened_at_once(self):
        pool, _, dialer = client_pool(min_capacity=100, max_capacity=100)
        pool.start()
        self.assertEqual(len(dialer.pending), MAX_DIALING)
        dialer.pending.pop(0).callback(Conn())  # one done: the next one starts
        self.assertEqual(len(dialer.pending), MAX_DIALING)
        dialer.pending.pop(0).errback(Exception("refused"))  # one failed: likewise
        self.assertEqual(len(dialer.pending), MAX_DIALING)
        dialer.complete_all()
        self.assertEqual(len(pool.idle), 99)  # the failed one waits for the next round

    def test_stale_connection_is_dropped(self):
        pool, _, dialer = client_pool()
        pool.start()
        conns = dialer.complete_all()
        pool.discard(conns[1])
        self.assertNotIn(conns[1], pool.idle)
        self.assertEqual(len(pool.idle), 3)

    def test_failed_dials_are_retried_next_round_and_logged(self):
        pool, clock, _ = client_pool()
        pool._dial = lambda: fail(ConnectionRefusedError("refused"))
        pool.start()
        self.assertEqual((pool.opening, len(pool.idle)), (0, 0))
        calls = []
        pool._dial = lambda: calls.append(1) or Deferred()
        clock.advance(pool.interval)
        self.assertEqual(len(calls), 4)

    def test_server_bound_caps_capacity(self):
        pool, _, dialer = client_pool(min_capacity=8, max_capacity=32)
        pool.start(max_capacity=5)
        self.assertEqual((pool.max_capacity, pool.capacity, len(dialer.pending)), (5, 5, 5))

    def test_server_bound_replaces_the_clients_own(self):
        """As NodePass does: a server's max=64 lifts a client's max=32; the client's min
        comes back when a later session allows it."""
        pool, _, dialer = client_pool(min_capacity=8, max_capacity=32)
        pool.start(max_capacity=5)
        self.assertEqual(pool.min_capacity, 5)
        pool.stop()
        dialer.complete_all()
        pool.start(max_capacity=64)
        self.assertEqual((pool.min_capacity, pool.max_capacity, pool.ready.limit), (8, 64, 64))
        self.assertEqual(pool.capacity, 8)

    def test_stop_closes_idle_and_ignores_late_dials(self):
        pool, clock, dialer = client_pool()
        pool.start()
        conns = [dialer.pending.pop(0).callback(Conn()) for _ in range(2)]
        del conns
        idle = list(pool.idle)
        pool.stop()
        self.assertTrue(all(c.closed for c in idle))
        (late, *_) = dialer.complete_all()
        self.assertTrue(late.closed)
        self.assertEqual(clock.getDelayedCalls(), [])


class IdlePoolTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.requests = []
        self.pool = IdlePool(self.clock, limit=2, wait_timeout=5.0,
                             request_more=self.requests.append)

    def test_first_come_first_served(self):
        a, b = Conn(), Conn()
        self.pool.add(a)
        self.pool.add(b)
        got = []
        self.pool.take(got.append, None)
        self.assertEqual(got, [a])

    def test_full_pool_refuses(self):
        self.assertEqual([self.pool.add(Conn()) for _ in range(3)], [True, True, False])

    def test_waiters_are_served_in_order_and_ask_for_more(self):
        got, timeouts = [], []
        self.pool.take(lambda c: got.append(("first", c)), lambda why: timeouts.append(1))
        self.pool.take(lambda c: got.append(("second", c)), lambda why: timeouts.append(why))
        self.assertEqual(self.requests, [1, 2])
        conn = Conn()
        self.pool.add(conn)
        self.assertEqual(got, [("first", conn)])
        self.clock.advance(5.0)
        self.assertEqual(timeouts, ["no pooled connection within 5s"])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_cancelled_waiter_is_forgotten(self):
        waiter = self.pool.take(lambda c: self.fail("served"),
                                lambda why: self.fail("timed out"))
        self.pool.cancel(waiter)
        self.clock.advance(10)
        self.assertTrue(self.pool.add(Conn()))

    def test_flush_closes_idle_and_turns_waiters_away(self):
        conn = Conn()
        self.pool.add(conn)
        self.pool.take(lambda c: None, None)
        timeouts = []
        self.pool.take(lambda c: None, lambda why: timeouts.append(1))
        self.pool.add(Conn())  # served to the waiter
        self.pool.take(lambda c: None, lambda why: timeouts.append(why))
        self.pool.flush()
        self.assertEqual(timeouts, ["the tunnel session ended"])
        self.assertEqual(self.clock.getDelayedCalls(), [])


class BoundsFromTheUrl(SynchronousTestCase):
    """min= is the client's floor; max= on the server bounds the pool and reaches the client
    in WELCOME (the environment tunables are the defaults of both)."""

    def test_server_max_bounds_its_pool_and_is_sent_in_welcome(self):
        from tests.memory import open_session, server_tunnel

        tunnel, _ = server_tunnel(controls={"max": 7})
        control = open_session(tunnel)
        self.assertEqual((control.settings["max_pool"], tunnel.pool.limit), (7, 7))
        default, _ = server_tunnel(max_pool_capacity=300)
        self.assertEqual(open_session(default).settings["max_pool"], 300)

    def test_client_min_and_max_set_its_pool(self):
        from nodepass.tunables import Tunables
        from nodepass.tunnel.client import ClientTunnel
        from nodepass.url import parse

        clock = Clock()
        tunnel = ClientTunnel(clock, parse("client://k@127.0.0.1:1/127.0.0.1:2?min=3&max=9"),
                              Tunables())
        self.assertEqual((tunnel.pool.min_capacity, tunnel.pool.max_capacity), (3, 9))
        default = ClientTunnel(clock, parse("client://k@127.0.0.1:1/127.0.0.1:2"),
                               Tunables(min_pool_capacity=5))
        self.assertEqual((default.pool.min_capacity, default.pool.max_capacity), (5, 1024))
