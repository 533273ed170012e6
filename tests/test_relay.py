"""The relay: backpressure by identity, half-close, counters, end, drain."""

from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from nodepass.tunnel.limits import MIN_BURST, TokenBucket
from nodepass.tunnel.relay import Relay, RelayProtocol, RelaySet
from tests.memory import transport_for


def pair(rate_a=None, clock=None):
    a, b = RelayProtocol(), RelayProtocol()
    a.makeConnection(transport_for(1))
    b.makeConnection(transport_for(2))
    counts = {"a": 0, "b": 0}
    ended = []
    relay = Relay(a, b, lambda n: counts.__setitem__("a", counts["a"] + n),
                  lambda n: counts.__setitem__("b", counts["b"] + n), ended.append,
                  rate_a=rate_a, clock=clock)
    return relay, a, b, counts, ended


class RelayTests(SynchronousTestCase):
    def test_each_transport_produces_for_the_other(self):
        relay, a, b, _, _ = pair()
        a.transport.pauseProducing()
        relay.start()
        self.assertEqual(a.transport.producerState, "producing")
        self.assertTrue(a.transport.streaming and b.transport.streaming)
        # b's full buffer pauses reading a, and only a; room again resumes it.
        b.transport.producer.pauseProducing()
        self.assertEqual((a.transport.producerState, b.transport.producerState),
                         ("paused", "producing"))
        a.transport.producer.pauseProducing()
        self.assertEqual(b.transport.producerState, "paused")
        b.transport.producer.resumeProducing()
        self.assertEqual(a.transport.producerState, "producing")

    def test_rate_holds_the_reading_side_until_the_bucket_refills(self):
        clock = Clock()
        a, b = RelayProtocol(), RelayProtocol()
        a.makeConnection(transport_for(1))
        b.makeConnection(transport_for(2))
        bucket = TokenBucket(clock, 100_000.0)  # bytes/s; burst 64 KiB
        relay = Relay(a, b, lambda n: None, lambda n: None, lambda r: None, rate_a=bucket,
                      clock=clock)
        relay.start()
        a.dataReceived(b"x" * (MIN_BURST + 50_000))  # 50,000 bytes of debt = 0.5 s
        self.assertEqual(a.transport.producerState, "paused")
        self.assertEqual(b.transport.producerState, "producing")  # the other way is free
        # The consumer's room does not release a rate hold.
        a.transport.producer.pauseProducing()
        b.transport.producer.pauseProducing()
        b.transport.producer.resumeProducing()
        self.assertEqual(a.transport.producerState, "paused")
        clock.advance(0.49)
        self.assertEqual(a.transport.producerState, "paused")
        clock.advance(0.02)
        self.assertEqual(a.transport.producerState, "producing")
        self.assertEqual(len(b.transport.value()), MIN_BURST + 50_000)

    def test_rate_hold_ends_with_the_relay(self):
        clock = Clock()
        relay, a, b, _, ended = pair(TokenBucket(clock, 1000.0), clock)
        relay.start()
        a.dataReceived(b"x" * (MIN_BURST + 1000))
        self.assertEqual(len(clock.getDelayedCalls()), 1)
        a.connectionLost(Failure(ConnectionDone()))
        b.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(ended, [relay])
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_bytes_cross_and_are_counted(self):
        relay, a, b, counts, _ = pair()
        relay.start()
        a.dataReceived(b"hello")
        b.dataReceived(b"world!")
        self.assertEqual((b.transport.value(), a.transport.value()), (b"hello", b"world!"))
        self.assertEqual(counts, {"a": 5, "b": 6})

    def test_pending_bytes_and_eof_are_delivered_first(self):
        relay, a, _, counts, _ = pair()
        relay.start(b_pending=b"early", b_eof=True)
        self.assertEqual(a.transport.value(), b"early")
        self.assertTrue(a.transport.write_closed)
        self.assertEqual(counts["b"], 5)

    def test_half_close_is_carried_and_replies_still_flow(self):
        relay, a, b, _, ended = pair()
        relay.start()
        a.readConnectionLost()
        self.assertTrue(b.transport.write_closed)
        self.assertIsNone(b.transport.producer)  # a produces nothing more
        self.assertFalse(a.transport.disconnecting)
        b.dataReceived(b"reply")
        self.assertEqual(a.transport.value(), b"reply")
        b.readConnectionLost()
        self.assertTrue(a.transport.disconnecting and b.transport.disconnecting)
        self.assertEqual(ended, [])

    def test_loss_of_one_side_closes_the_other_once(self):
        relay, a, b, _, ended = pair()
        relay.start()
        a.connectionLost(Failure(ConnectionDone()))
        self.assertTrue(b.transport.disconnecting)
        self.assertIsNone(a.transport.producer)
        self.assertIsNone(b.transport.producer)
        self.assertEqual(ended, [])
        b.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(ended, [relay])


class DrainTests(SynchronousTestCase):
    def test_drain_waits_for_relays_then_aborts_after_the_timeout(self):
        clock, relays = Clock(), RelaySet()
        relay, a, b, _, _ = pair()
        relay._on_end = relays.discard
        relays.add(relay)
        relay.start()
        done = relays.drain(clock, 5.0)
        clock.advance(4.9)
        self.assertNoResult(done)
        clock.advance(0.2)
        self.assertTrue(a.transport.disconnected and b.transport.disconnected)  # aborted
        a.connectionLost(Failure(ConnectionDone()))
        b.connectionLost(Failure(ConnectionDone()))
        self.successResultOf(done)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_drain_fires_early_when_the_last_relay_ends(self):
        clock, relays = Clock(), RelaySet()
        relay, a, b, _, _ = pair()
        relay._on_end = relays.discard
        relays.add(relay)
        relay.start()
        done = relays.drain(clock, 5.0)
        a.connectionLost(Failure(ConnectionDone()))
        self.assertNoResult(done)  # b is still writing what it holds
        b.connectionLost(Failure(ConnectionDone()))
        self.successResultOf(done)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_nothing_to_drain(self):
        self.successResultOf(RelaySet().drain(Clock(), 5.0))
