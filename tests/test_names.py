"""dns=: target names resolved through a cache with a TTL, on a Clock with a fake resolver."""

from twisted.internet.address import IPv4Address
from twisted.internet.defer import CancelledError
from twisted.internet.interfaces import IHostnameResolver
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from nodepass.names import NameCache
from nodepass.tunables import Tunables
from nodepass.tunnel.targets import TargetDialer
from nodepass.url import parse


@implementer(IHostnameResolver)
class Resolver:
    """Answers by hand: ``answer(name)`` completes the oldest lookup of ``name``."""

    def __init__(self, table):
        self.table = table
        self.asked = []

    def resolveHostName(self, receiver, hostName, portNumber=0, addressTypes=None,
                        transportSemantics="TCP"):
        self.asked.append((hostName, receiver))
        return receiver

    def answer(self, name=None):
        index = next(i for i, (n, _) in enumerate(self.asked) if name in (None, n))
        host, receiver = self.asked.pop(index)
        receiver.resolutionBegan(None)
        for ip in self.table.get(host, []):
            receiver.addressResolved(IPv4Address("TCP", ip, 0))
        receiver.resolutionComplete()


class Cache(SynchronousTestCase):
    def cache(self, ttl, table=None):
        clock = Clock()
        resolver = Resolver(table if table is not None else {"svc.test": ["10.0.0.1",
                                                                           "10.0.0.2"]})
        return NameCache(clock, ttl, resolver), clock, resolver

    def test_an_ip_is_its_own_answer(self):
        names, _, resolver = self.cache(300)
        self.assertEqual(self.successResultOf(names.resolve("192.0.2.7")), ["192.0.2.7"])
        self.assertEqual(self.successResultOf(names.resolve("::1")), ["::1"])
        self.assertEqual(resolver.asked, [])

    def test_a_name_is_kept_for_the_ttl_then_asked_again(self):
        names, clock, resolver = self.cache(300)
        first = names.resolve("svc.test")
        resolver.answer()
        self.assertEqual(self.successResultOf(first), ["10.0.0.1", "10.0.0.2"])
        clock.advance(299)
        self.assertEqual(self.successResultOf(names.resolve("svc.test")),
                         ["10.0.0.1", "10.0.0.2"])
        self.assertEqual(resolver.asked, [])
        clock.advance(1)
        later = names.resolve("svc.test")
        self.assertEqual(len(resolver.asked), 1)
        resolver.answer()
        self.successResultOf(later)

    def test_dns_0_asks_every_time(self):
        names, _, resolver = self.cache(0)
        for _ in range(3):
            d = names.resolve("svc.test")
            resolver.answer()
            self.successResultOf(d)
        self.assertEqual(resolver.asked, [])
        names.resolve("svc.test")
        names.resolve("other.test")
        self.assertEqual([n for n, _ in resolver.asked], ["svc.test", "other.test"])

    def test_overlapping_lookups_share_one_query(self):
        names, _, resolver = self.cache(300)
        waiting = [names.resolve("svc.test") for _ in range(5)]
        self.assertEqual(len(resolver.asked), 1)
        resolver.answer()
        self.assertEqual({tuple(self.successResultOf(d)) for d in waiting},
                         {("10.0.0.1", "10.0.0.2")})

    def test_a_failed_lookup_is_not_kept(self):
        names, _, resolver = self.cache(300, table={})
        failed = names.resolve("gone.test")
        resolver.answer()
        self.assertIn("gone.test has no address", str(self.failureResultOf(failed).value))
        names.resolve("gone.test")
        self.assertEqual(len(resolver.asked), 1)

    def test_forget_drops_a_kept_name(self):
        names, _, resolver = self.cache(300)
        names.resolve("svc.test")
        resolver.answer()
        names.forget("svc.test")
        names.resolve("svc.test")
        self.assertEqual(len(resolver.asked), 1)


class Dialer(SynchronousTestCase):
    """The target dialer dials what the cache says, and forgets a name none of whose
    addresses answers."""

    def dialer(self, url="client://h:1/svc.test:8080?dns=1m"):
        reactor = MemoryReactorClock()
        resolver = Resolver({"svc.test": ["10.0.0.1", "10.0.0.2"]})
        reactor.nameResolver = resolver
        dialer = TargetDialer.for_config(reactor, parse(url), Tunables())
        return dialer, reactor, resolver

    def test_dns_from_the_url_sets_the_ttl(self):
        dialer, reactor, resolver = self.dialer()
        self.assertEqual(dialer.names.ttl, 60.0)
        dialer.connect(Factory.forProtocol(Protocol))
        resolver.answer()
        self.assertEqual(reactor.tcpClients[-1][:2], ("10.0.0.1", 8080))
        dialer.connect(Factory.forProtocol(Protocol))
        self.assertEqual((resolver.asked, reactor.tcpClients[-1][:2]), ([], ("10.0.0.1", 8080)))
        reactor.advance(60)
        dialer.connect(Factory.forProtocol(Protocol))
        self.assertEqual(len(resolver.asked), 1)

    def test_the_next_address_is_tried_and_a_dead_name_forgotten(self):
        from twisted.internet.error import ConnectionRefusedError

        dialer, reactor, resolver = self.dialer()
        attempt = dialer.connect(Factory.forProtocol(Protocol))
        resolver.answer()
        for ip in ("10.0.0.1", "10.0.0.2"):
            host, port, factory, *_ = reactor.tcpClients[-1]
            self.assertEqual((host, port), (ip, 8080))
            factory.clientConnectionFailed(None, ConnectionRefusedError())
        self.failureResultOf(attempt, ConnectionRefusedError)
        dialer.connect(Factory.forProtocol(Protocol))
        self.assertEqual(len(resolver.asked), 1)  # looked up afresh

    def test_a_cancelled_dial_stops_at_the_lookup(self):
        dialer, _, resolver = self.dialer()
        attempt = dialer.connect(Factory.forProtocol(Protocol))
        attempt.cancel()
        self.failureResultOf(attempt, CancelledError)
        resolver.answer()  # the late answer is kept for the next one, and harms nothing
        dialer.connect(Factory.forProtocol(Protocol))
        self.assertEqual(resolver.asked, [])
