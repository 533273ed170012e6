"""The traffic controls' pieces on a Clock: token buckets, valves, idle watches,
slot bounds, target rotation and failover, PROXY headers (parsed by Twisted)."""

import errno

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.protocols.haproxy._v1parser import V1Parser
from twisted.protocols.haproxy._v2parser import V2Parser
from twisted.trial.unittest import SynchronousTestCase

from nodepass import proxyproto
from nodepass.tunnel.limits import MIN_BURST, IdleWatch, TokenBucket, Valve, slot_limit
from nodepass.tunnel.targets import TargetDialer, TargetsUnreachableError
from nodepass.tunnel.udp import UdpCounters
from nodepass.url import Address
from tests.memory import transport_for, udp_over_connection


class Buckets(SynchronousTestCase):
    def test_debt_is_the_wait(self):
        clock = Clock()
        bucket = TokenBucket(clock, 1000.0)
        self.assertEqual(bucket.burst, MIN_BURST)
        self.assertEqual(bucket.take(MIN_BURST), 0.0)
        self.assertAlmostEqual(bucket.take(500), 0.5)
        clock.advance(0.25)
        self.assertAlmostEqual(bucket.delay(), 0.25)
        clock.advance(0.25)
        self.assertEqual(bucket.delay(), 0.0)

    def test_refill_is_capped_at_the_burst(self):
        clock = Clock()
        bucket = TokenBucket(clock, 10_000_000.0)  # 10 MB/s: burst = 50 ms of it
        self.assertEqual(bucket.burst, 500_000)
        clock.advance(60)
        self.assertTrue(bucket.try_take(500_000))
        self.assertFalse(bucket.try_take(1))

    def test_udp_pays_now_or_is_refused(self):
        clock = Clock()
        bucket = TokenBucket(clock, 1000.0)
        self.assertTrue(bucket.try_take(MIN_BURST - 100))
        self.assertFalse(bucket.try_take(200))  # refused, and not taken either
        self.assertTrue(bucket.try_take(100))
        clock.advance(0.1)
        self.assertTrue(bucket.try_take(100))


class Valves(SynchronousTestCase):
    def test_reading_resumes_only_when_no_reason_holds(self):
        transport = transport_for(1)
        valve = Valve(transport)
        valve.release("start")
        valve.pauseProducing()
        valve.hold("rate")
        self.assertEqual(transport.producerState, "paused")
        valve.resumeProducing()
        self.assertEqual(transport.producerState, "paused")
        valve.release("rate")
        self.assertEqual(transport.producerState, "producing")


class Idle(SynchronousTestCase):
    def test_fires_after_the_timeout_without_touches(self):
        clock, fired = Clock(), []
        watch = IdleWatch(clock, 2.0, lambda: fired.append(clock.seconds()))
        clock.advance(1.5)
        watch.touch()
        clock.advance(1.9)
        self.assertEqual(fired, [])
        clock.advance(0.2)
        self.assertEqual(len(fired), 1)

    def test_cancel(self):
        clock, fired = Clock(), []
        IdleWatch(clock, 1.0, lambda: fired.append(1)).cancel()
        clock.advance(5)
        self.assertEqual((fired, clock.getDelayedCalls()), ([], []))


class Slots(SynchronousTestCase):
    def test_the_smaller_bound_is_in_force_and_named(self):
        self.assertEqual(slot_limit(65536, 1024), (1024, "SEMAPHORE_LIMIT (1024)"))
        self.assertEqual(slot_limit(10, 1024), (10, "slot limit (10)"))
        self.assertEqual(slot_limit(0, 1024), (1024, "SEMAPHORE_LIMIT (1024)"))


class _Endpoint:
    def __init__(self, name, log):
        self.name, self.log, self.up = name, log, True

    def connect(self, factory):
        self.log.append(self.name)
        if self.up:
            return succeed(self.name)
        return fail(ConnectionRefusedError(osError=errno.ECONNREFUSED))


def dialer(clock, *names):
    log = []
    endpoints = {Address("127.0.0.1", n): _Endpoint(n, log) for n in names}
    d = TargetDialer(clock, [Address("127.0.0.1", n) for n in names], retry_after=5.0,
                     endpoint_for=endpoints.__getitem__)
    return d, endpoints, log


def result_of(deferred: Deferred):
    results = []
    deferred.addBoth(results.append)
    return results[0]


class Rotation(SynchronousTestCase):
    def test_new_connections_take_turns(self):
        d, _, _ = dialer(Clock(), 1, 2, 3)
        self.assertEqual([result_of(d.connect(None)) for _ in range(6)], [1, 2, 3, 1, 2, 3])

    def test_a_refusing_target_is_skipped_until_its_retry_time(self):
        clock = Clock()
        d, endpoints, log = dialer(clock, 1, 2)
        endpoints[Address("127.0.0.1", 1)].up = False
        self.assertEqual([result_of(d.connect(None)) for _ in range(4)], [2, 2, 2, 2])
        self.assertEqual(log, [1, 2, 2, 2, 2])  # tried once, then skipped
        endpoints[Address("127.0.0.1", 1)].up = True
        clock.advance(5.0)
        self.assertEqual(sorted(result_of(d.connect(None)) for _ in range(2)), [1, 2])

    def test_when_all_are_down_each_is_tried_and_the_reasons_named(self):
        d, endpoints, _ = dialer(Clock(), 1, 2)
        for endpoint in endpoints.values():
            endpoint.up = False
        failure = result_of(d.connect(None))
        self.assertIsInstance(failure.value, TargetsUnreachableError)
        self.assertIn("127.0.0.1:1: Connection refused", str(failure.value))
        self.assertIn("127.0.0.1:2: Connection refused", str(failure.value))
        endpoints[Address("127.0.0.1", 2)].up = True
        self.assertEqual(result_of(d.connect(None)), 2)  # down ones are still tried

    def test_one_target_fails_with_its_own_reason(self):
        d, endpoints, _ = dialer(Clock(), 1)
        endpoints[Address("127.0.0.1", 1)].up = False
        self.assertIsInstance(result_of(d.connect(None)).value, ConnectionRefusedError)


class ProxyHeaders(SynchronousTestCase):
    def test_v1_is_what_haproxy_parses(self):
        header = proxyproto.v1(("127.0.0.1", 5000), ("127.0.0.2", 80))
        self.assertEqual(header, b"PROXY TCP4 127.0.0.1 127.0.0.2 5000 80\r\n")
        info = V1Parser.parse(header.rstrip(b"\r\n"))
        self.assertEqual((info.source.host, info.source.port), ("127.0.0.1", 5000))
        self.assertEqual((info.destination.host, info.destination.port), ("127.0.0.2", 80))

    def test_v1_ipv6_and_unknown(self):
        info = V1Parser.parse(proxyproto.v1(("::1", 1), ("::2", 2)).rstrip(b"\r\n"))
        self.assertEqual((info.source.type, info.source.port), ("TCP", 1))
        self.assertEqual(proxyproto.v1(("", 0), ("::2", 2)), b"PROXY UNKNOWN\r\n")

    def test_v2_is_what_haproxy_parses(self):
        for source, dest in ((("127.0.0.1", 5000), ("127.0.0.2", 80)),
                             (("::1", 5000), ("::2", 80)),
                             (("127.0.0.1", 5000), ("::2", 80))):
            info = V2Parser.parse(proxyproto.v2(source, dest))
            self.assertEqual(info.source.port, 5000)
            self.assertEqual(info.destination.port, 80)
        mixed = V2Parser.parse(proxyproto.v2(("127.0.0.1", 1), ("::2", 2)))
        self.assertEqual(mixed.source.host, "0:0:0:0:0:ffff:7f00:1")

    def test_addresses_as_launch_carries_them(self):
        self.assertEqual(proxyproto.split_address("[::1]:80"), ("::1", 80))
        self.assertEqual(proxyproto.split_address("127.0.0.1:5"), ("127.0.0.1", 5))
        self.assertEqual(proxyproto.split_address("?"), ("", 0))


class UdpRate(SynchronousTestCase):
    def test_datagrams_over_the_rate_are_dropped_both_ways(self):
        clock, drops, delivered = Clock(), UdpCounters(), []
        rate_in, rate_out = TokenBucket(clock, 1000.0), TokenBucket(clock, 1000.0)
        _, session = udp_over_connection(clock, delivered.append, 60.0, 65535, lambda n: None,
                                         lambda n: None, drops, lambda s: None, rate_in,
                                         rate_out)
        big = b"x" * 40_000
        self.assertTrue(session.to_tunnel(big))
        self.assertFalse(session.to_tunnel(big))  # over the burst: dropped, not queued
        session.from_tunnel(big)
        session.from_tunnel(big)
        self.assertEqual((len(delivered), drops.overload), (1, 2))
        clock.advance(40.0)
        self.assertTrue(session.to_tunnel(big))
