"""A master in memory: the real Registry, EventHub and both API dialects on a Clock,
with instance processes played by :class:`Children` and HTTP by treq over
:class:`SiteAgent`: connections in memory to the master's own site (its HTTP/1.1 channel
and gate, which treq's StubTreq would replace by a plain Site).

What a child process would say (ready, reports, log lines, its exit) is said by the
test through the same ChildProcess protocol the master reads real children with.
"""

from __future__ import annotations

import json
import os
import signal
import tempfile
from pathlib import Path
from typing import Any

import treq
from treq.client import HTTPClient
from twisted.internet.address import IPv4Address
from twisted.internet.defer import succeed
from twisted.internet.error import ProcessDone, ProcessExitedAlready, ProcessTerminated
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.test import iosim
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.iweb import IAgent, IAgentEndpointFactory, IBodyProducer
from zope.interface import implementer

from nodepass.master.events import EventHub
from nodepass.master.registry import Registry
from nodepass.master.service import ApiSite, api_app
from nodepass.master.state import KEY_FILE, ApiKey
from nodepass.master.store import Store
from nodepass.tunables import Tunables
from nodepass.url import MasterConfig

KEY = "memory-key"
NOW = 2_000_000_000.0  # 2033: after this machine booted, so uptimes are positive
READY_REPORT = {"type": "report", "state": "waiting", "pool": 0, "connections": 0,
                "ping_ms": None, "tcp_in": 0, "tcp_out": 0, "udp_in": 0, "udp_out": 0,
                "udp_sessions": 0, "udp_dropped": 0, "refused": 0, "mode": "reverse"}


class FakeProcess:
    """A child's process transport: a signal ends it at once, as a well-behaved child."""

    def __init__(self, child: Any, pid: int) -> None:
        self.child = child
        self.pid = pid
        self.signals: list[int] = []
        self.ended = False

    stubborn = False  # ignores SIGTERM

    def signalProcess(self, sig: int) -> None:
        if self.ended:
            raise ProcessExitedAlready()
        self.signals.append(sig)
        if sig == signal.SIGKILL:
            self.exit(None, sig)
        elif not self.stubborn:
            self.exit(0)

    def exit(self, code: int | None, sig: int | None = None) -> None:
        self.ended = True
        reason = ProcessDone(0) if code == 0 and sig is None else ProcessTerminated(code, sig)
        self.child.processEnded(Failure(reason))
        self.child.channel_closed()


class Children:
    """Plays every instance process: each says it is ready and reports at once."""

    def __init__(self) -> None:
        self.spawned: list[tuple[str, Any, FakeProcess]] = []
        self.times: list[float] = []  # when each was started, on the master's clock
        self.environ: list[Any] = []
        self.refuse_start = False
        self.failing: list[str] = []  # fatal messages the next children die with
        self.silent = False  # the next children never say they are ready
        self.stubborn = False  # the next children ignore SIGTERM

    def __call__(self, reactor: Any, url: str, environ: Any, child: Any) -> Any:
        if self.refuse_start:
            raise OSError("cannot fork")
        process = FakeProcess(child, 4000 + len(self.spawned))
        process.stubborn = self.stubborn
        child.makeConnection(process)
        self.spawned.append((url, child, process))
        self.times.append(reactor.seconds())
        self.environ.append(environ)
        if self.failing:
            message = self.failing.pop(0)

            def die() -> None:  # as a real child does: a moment after it was started
                child.on_event({"type": "fatal", "message": message})
                process.exit(1)

            reactor.callLater(0, die)
            return child
        if not self.silent:
            child.on_event({"type": "ready"})
            child.on_event(dict(READY_REPORT))
        return child

    def running(self) -> list[tuple[str, Any, FakeProcess]]:
        return [s for s in self.spawned if not s[2].ended]

    def kill(self, instance_id: str, sig: int = signal.SIGKILL) -> None:
        """Killed from outside, as ``kill -9`` would."""
        self.latest(instance_id)[2].exit(None, sig)

    def lose_host(self, instance_id: str, sig: int = signal.SIGSEGV) -> None:
        """Its host (shared with others) ended under it, as hosts.Host reports it."""
        child = self.latest(instance_id)[1]
        child.host_lost = True
        self.latest(instance_id)[2].exit(None, sig)

    def latest(self, instance_id: str) -> tuple[str, Any, FakeProcess]:
        return next(s for s in reversed(self.spawned) if s[1].instance_id == instance_id)

    def report(self, instance_id: str, **values: Any) -> None:
        self.latest(instance_id)[1].on_event({**READY_REPORT, **values})

    def say(self, instance_id: str, text: str, level: str = "INFO") -> str:
        """The child logs ``text``: a record on its status channel; returns its line."""
        line = f"2026-01-01 10:00:00.000  {level:<5}  {text}"
        self.latest(instance_id)[1].log_record({"type": "log", "level": level, "text": text,
                                                "line": line})
        return line


@implementer(IBodyProducer)
class _Body:
    """A request body written at once (treq's default producer needs a running reactor)."""

    def __init__(self, data: bytes) -> None:
        self.data, self.length = data, len(data)

    def startProducing(self, consumer: Any) -> Any:
        consumer.write(self.data)
        return succeed(None)

    def stopProducing(self) -> None:
        pass

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass


@implementer(IAgent, IAgentEndpointFactory)
class SiteAgent:
    """An HTTP client agent whose every connection goes, in memory, to ``site``;
    ``flush()`` moves the bytes both ways."""

    def __init__(self, site: Any, host: IPv4Address) -> None:
        self.site, self.host = site, host
        self.pumps: list[iosim.IOPump] = []
        reactor = MemoryReactorClock()
        self._agent = Agent.usingEndpointFactory(
            reactor, self, pool=HTTPConnectionPool(reactor, persistent=False))

    def endpointForURI(self, uri: Any) -> Any:
        return _SiteEndpoint(self)

    def request(self, method: bytes, uri: bytes, headers: Any = None,
                bodyProducer: Any = None) -> Any:
        return self._agent.request(method, uri, headers, bodyProducer)

    def flush(self) -> None:
        for pump in list(self.pumps):
            pump.flush()
        self.pumps = [p for p in self.pumps
                      if not (p.clientIO.disconnected and p.serverIO.disconnected)]


@implementer(IStreamClientEndpoint)
class _SiteEndpoint:
    def __init__(self, agent: SiteAgent) -> None:
        self.agent = agent

    def connect(self, factory: Any) -> Any:
        peer = IPv4Address("TCP", "127.0.0.1", 40000 + len(self.agent.pumps))
        server = self.agent.site.buildProtocol(peer)
        client = factory.buildProtocol(self.agent.host)
        self.agent.pumps.append(iosim.connect(
            server, iosim.FakeTransport(server, True, self.agent.host, peer),
            client, iosim.FakeTransport(client, False, peer, self.agent.host), greet=False))
        return succeed(client)


class MemoryHttp:
    """treq's API (``request``, ``content``) over a :class:`SiteAgent`, and ``flush``.
    A request reaches the master at once, as with StubTreq."""

    def __init__(self, site: Any, host: IPv4Address) -> None:
        self.agent = SiteAgent(site, host)
        self.client = HTTPClient(self.agent, data_to_body_producer=_Body)
        self.content = treq.content
        self.flush = self.agent.flush

    def request(self, method: str, url: str, **kwargs: Any) -> Any:
        sent = self.client.request(method, url, **kwargs)
        self.flush()
        return sent


class MemoryMaster:
    def __init__(self, case: Any, key: str | None = KEY, config: MasterConfig | None = None,
                 **tunables: Any) -> None:
        self.clock = Clock()
        self.clock.advance(NOW)
        self.children = Children()
        self.config = config or MasterConfig()
        self.folder = Path(tempfile.mkdtemp())
        case.addCleanup(lambda: ([p.unlink() for p in self.folder.iterdir()]
                        and None) or os.rmdir(self.folder))
        self.store = Store.open(None)
        self.hub = EventHub(self.clock)
        self.hub.start()
        case.addCleanup(self.hub.stop)
        self.registry = Registry(self.clock, self.config, Tunables(**tunables), {}, self.store,
                                 self.hub, spawn=self.children)
        self.registry.restore()
        key_path = self.folder / KEY_FILE
        if key is not None:
            key_path.write_text(key + "\n")
        self.key = ApiKey(key, "file" if key else "none", key_path)
        self.api = api_app(self.registry, self.config, self.key, str(self.folder))
        self.site = ApiSite(self.api.app.resource(), self.api.gate, timeout=60,
                            reactor=self.clock)
        api = self.config.api
        self.http = MemoryHttp(self.site, IPv4Address("TCP", api.host, api.port or 9090))
        # requests name the master as a browser would, by its listen address
        self.origin = f"http://{api}"
        self.seed = f"{self.origin}{self.config.prefix}/v1"
        self.np = f"{self.origin}{self.config.np_prefix}/v1"
        case.addCleanup(self.stop)

    def stop(self) -> None:
        for _, _child, process in self.children.spawned:
            if not process.ended:
                process.exit(0)

    async def call(self, method: str, url: str, body: Any = None, key: str | None = KEY,
                   raw: bytes | None = None, headers: dict | None = None
                   ) -> tuple[int, Any, Any]:
        """-> (status, the JSON body parsed (or text, or None), response)."""
        all_headers = {"X-API-Key": [key]} if key else {}
        all_headers.update(headers or {})
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None
                                            else None)
        if data is not None and "Content-Type" not in all_headers:
            all_headers["Content-Type"] = ["application/json"]
        requested = self.http.request(method, url, data=data, headers=all_headers)
        self.clock.advance(0)  # what children do "at once" happens now
        self.http.flush()
        response = await requested
        body = await self.http.content(response)
        ctype = (response.headers.getRawHeaders("Content-Type") or [""])[0]
        if not body:
            return response.code, None, response
        if ctype.startswith("application/json"):
            return response.code, json.loads(body), response
        return response.code, body.decode(), response
