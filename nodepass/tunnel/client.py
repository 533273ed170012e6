"""Client mode: a reconnecting control channel, a pool of data connections, and
for each launch a connection to the local target relayed through the tunnel
(reverse mode, egress.py) — or, when the server is in forward mode, a listener on
the local target address whose users launch the pooled connections (ingress.py).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

from twisted.application.internet import ClientService
from twisted.application.service import MultiService, Service
from twisted.internet.defer import CancelledError, Deferred, gatherResults
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.python.failure import Failure
from zope.interface import implementer

from nodepass import logs
from nodepass.backoff import backoff
from nodepass.endpoints import describe_failure, dial_endpoint
from nodepass.stats import Report, snapshot
from nodepass.tls import ClientTLS, fingerprint_text, pinning_tls, verifying_tls
from nodepass.tunables import Tunables
from nodepass.tunnel import carriers
from nodepass.tunnel.channel import QuietFactory
from nodepass.tunnel.connection import TunnelConnection, dialed
from nodepass.tunnel.control import ControlSession
from nodepass.tunnel.egress import Egress
from nodepass.tunnel.flows import Flows
from nodepass.tunnel.handshake import ClientHandshake, SessionKeys
from nodepass.tunnel.ingress import Ingress
from nodepass.tunnel.pool import ClientPool
from nodepass.tunnel.targets import TargetDialer
from nodepass.tunnel.wire import Goodbye, Kind, Launch, ProtocolError
from nodepass.url import TRANSPORTS, ClientConfig, derived_key, format_targets

RECONNECT_JITTER = 0.25  # a fleet of clients does not stampede a restarted server


@implementer(IStreamClientEndpoint)
class _ReportingEndpoint:
    """Dials through ``endpoint`` and reports each failure before ClientService retries."""

    def __init__(self, endpoint: IStreamClientEndpoint,
                 on_failure: Callable[[Failure], None]) -> None:
        self._endpoint = endpoint
        self._on_failure = on_failure

    def connect(self, factory: Any) -> Deferred[Any]:
        def failed(reason: Failure) -> Failure:
            self._on_failure(reason)
            return reason

        return self._endpoint.connect(factory).addErrback(failed)


class ClientTunnel(MultiService):
    """The client's state: the control session, the pool, the live relays."""

    log = logs.logger("nodepass")

    def __init__(self, reactor: Any, config: ClientConfig, tunables: Tunables,
                 rand: Callable[[], float] = random.random,
                 on_fatal: Callable[[str], None] | None = None,
                 server: IStreamClientEndpoint | None = None,
                 dialer: TargetDialer | None = None,
                 forward_listeners: Callable[[ClientTunnel], list[Service]] | None = None
                 ) -> None:
        super().__init__()
        self.clock = reactor
        self.config = config
        self.tunables = tunables
        self.on_fatal = on_fatal
        self.key = derived_key(config).encode()
        self.endpoint = server or dial_endpoint(reactor, config.tunnel)
        self._tls_options: dict[tuple[int, tuple[str, ...]], ClientTLS] = {}
        self.data_type, self.data_path = config.type, config.path  # the server's, once known
        self.http2: Any = None  # type=3: the session's connection (h2stream.Http2Pool)
        self.quic: Any = None  # type=1: the session's QUIC connection (quicstream.QuicPool)
        self.control_service = ClientService(
            _ReportingEndpoint(self.endpoint, self._dial_failed), self._control_factory(),
            clock=reactor,
            retryPolicy=backoff(tunables.service_cooldown, RECONNECT_JITTER, rand))
        self.control_service.setServiceParent(self)
        self.session: TunnelConnection | None = None
        self.control: ControlSession | None = None
        self.session_fingerprint = b""
        self.session_id = b""
        self.session_keys: SessionKeys | None = None
        self.session_tls = 0
        self._tls_throttle = logs.Throttle(reactor, 60.0)
        self.pool = ClientPool(reactor, self._dial_data,
                               config.min or tunables.min_pool_capacity,
                               config.max or tunables.max_pool_capacity,
                               tunables.min_pool_interval, tunables.max_pool_interval)
        self.flows = Flows.for_config(reactor, tunables, config)
        dialer = dialer or TargetDialer.for_config(reactor, config, tunables)
        self.egress = Egress(self.flows, dialer, config.proxy, config.notcp, config.noudp)
        self.ingress = Ingress(self.flows, self.pool, self._unavailable, config.proxy)
        self.mode = ""  # the server's mode, reverse or forward, once a session said which
        # what listens on the target address in forward mode (tap says what; made then)
        self.forward_listeners = forward_listeners or (lambda tunnel: [])
        self.listeners: list[Service] = []
        self.stopping = False
        self._auth_throttle = logs.Throttle(reactor, 60.0)

    # -- the control session ---------------------------------------------

    def session_up(self, conn: TunnelConnection, handshake: ClientHandshake,
                   settings: dict[str, Any]) -> None:
        interval = settings.get("heartbeat_ms")
        if not isinstance(interval, int) or interval <= 0:
            interval = int(self.tunables.report_interval * 1000)
        max_pool = settings.get("max_pool")
        if settings.get("type") in (1, 2, 3) and isinstance(settings.get("path"), str):
            self.data_type, self.data_path = settings["type"], settings["path"]
        else:
            self.data_type, self.data_path = self.config.type, self.config.path
        if self.data_type == 1:
            self.quic = self._quic_pool(conn, handshake.tls_mode)
        elif self.data_type == 3:
            from nodepass.tunnel.h2stream import Http2Pool

            self.http2 = Http2Pool(
                self.endpoint,
                self.tls_creator(handshake.tls_mode, ("h2",)) if handshake.tls_mode else None,
                self.config.sni or self.config.tunnel.host, self.data_path,
                lambda: TunnelConnection(self.clock, dialed(
                    self, Kind.DATA, (self.session_id, self.session_keys))))
        control = ControlSession(
            self.clock, interval / 1000.0, conn.send_signal,
            on_dead=lambda: self._session_dead(conn),
            on_demand=self.pool.demand,
            on_goodbye=lambda reason: self._goodbye(conn, reason),
        )
        conn.open_control(control)
        self.session, self.control = conn, control
        self.session_fingerprint = handshake.binding
        self.session_id, self.session_keys = handshake.session()
        self.session_tls = handshake.tls_mode
        control.start()
        self.pool.start(max_pool if isinstance(max_pool, int) and max_pool > 0 else None)
        self._set_mode("forward" if settings.get("mode") == "forward" else "reverse")
        tls = handshake.tls_mode
        carried = getattr(conn.transport, "carrier_tls", None)
        if tls == 2 and carried and not conn.transport.carrier_verified:
            how = (f"tls=2, certificate {fingerprint_text(handshake.binding)} pinned by the "
                   f"handshake; this client's TLS did not verify it (its URL says "
                   f"tls={self.config.required_tls})")
        elif tls:
            how = f"tls={tls}, certificate {fingerprint_text(handshake.binding)}"
        elif self.tls_ends_at_proxy(tls, conn.transport):
            how = ("TLS to the proxy, certificate verified for "
                   f"{self.config.sni or self.config.tunnel.host}; the server behind it tls=0")
        else:
            how = "tls=0, not encrypted"
        self.log.info("connected to server {peer}: tunnel session open ({how})", peer=conn.peer,
                      how=how)

    def _dial_failed(self, reason: Failure) -> None:
        if not reason.check(CancelledError):
            self.log.warn("cannot connect to server {server}: {reason}; retrying",
                          server=self.config.tunnel, reason=describe_failure(reason))

    def _session_dead(self, conn: TunnelConnection) -> None:
        self.log.warn("server {peer} missed its heartbeats: closing the session", peer=conn.peer)
        conn.abort()

    def _goodbye(self, conn: TunnelConnection, reason: int) -> None:
        if reason == Goodbye.SHUTDOWN:
            self.log.info("server {peer} is shutting down", peer=conn.peer)
        conn.close()

    def tls_creator(self, mode: int, alpn: tuple[str, ...] = ()) -> ClientTLS:
        """What this client dials TLS with: pinning (tls=1) or verifying (tls=2), asking
        for the protocols ``alpn`` (h2 for the HTTP/2 pool)."""
        key = (mode, alpn)
        if key not in self._tls_options:
            if mode == 1:
                self._tls_options[key] = pinning_tls(alpn)
            else:
                name = self.config.sni or self.config.tunnel.host
                self._tls_options[key] = verifying_tls(name, self.config.ca, alpn)
        return self._tls_options[key]

    def refuse_mode(self, kind: Kind, mode: int, transport: Any = None) -> str | None:
        """Why this client will not take the TLS mode a server offers, or None: below
        its ``tls=`` (``ca=``/``sni=`` mean 2) — unless TLS ends at a proxy this client
        verified (:meth:`tls_ends_at_proxy`) — or not its session's."""
        least = self.config.required_tls
        if mode < least and not self.tls_ends_at_proxy(mode, transport):
            why = "its URL asks for a verified certificate (ca= or sni=)" \
                if least == 2 and self.config.tls < 2 else f"its URL says tls={least}"
            return (f"it offers tls={mode}, and this client accepts tls={least} or more "
                    f"({why})")
        if kind is Kind.DATA and mode != self.session_tls:
            return f"a data connection offers tls={mode}, its session tls={self.session_tls}"
        return None

    def tls_ends_at_proxy(self, mode: int, transport: Any) -> bool:
        """``tlsproxy=1``, and a WebSocket this client opened in TLS it verified (tls=2:
        the chain and the name), to a server running tls=0: a reverse proxy terminates
        TLS in front of it (docs/configuration.md, "TLS terminated at a proxy").  The
        client's guarantees hold up to the proxy it verified; the hop behind it is the
        operator's."""
        # (url.py admits tlsproxy=1 only with type=2 and a verified certificate)
        return (mode == 0 and self.config.tlsproxy == 1
                and bool(getattr(transport, "carrier_verified", False)))

    def key_refused(self, conn: TunnelConnection, fingerprint: str) -> None:
        """The server did not prove the key: a different key, or a man in the middle."""
        if fingerprint:
            why = (f"it does not prove the tunnel key for the certificate it showed "
                   f"({fingerprint[:23]}...): a man in the middle, or a different key")
        else:
            why = "it does not prove the tunnel key: the keys differ (check both ends)"
        self.tls_refused(conn, why)

    def closed_in_handshake(self, conn: TunnelConnection) -> None:
        if not self.stopping and self._auth_throttle.allow() is not None:
            self.log.warn("server {peer} closed the connection during the handshake (too many "
                          "attempts from here, or not a nodepass server of this version); "
                          "retrying", peer=conn.peer)

    def tls_refused(self, conn: TunnelConnection, why: str) -> None:
        if self._tls_throttle.allow() is not None:
            self.log.error("refusing server {peer}: {why}", peer=conn.peer, why=why)
        conn.abort()

    def tls_failed(self, why: str) -> None:
        if not self.stopping and self._tls_throttle.allow() is not None:
            self.log.error("TLS with server {server} failed: {why}", server=self.config.tunnel,
                           why=why)

    def auth_refused(self, conn: TunnelConnection) -> None:
        """The server closed the control connection after our AUTH."""
        if not self.stopping and self._auth_throttle.allow() is not None:
            self.log.error("authentication failed at server {peer}: check the tunnel key",
                           peer=conn.peer)

    def busy(self, conn: TunnelConnection) -> None:
        self.log.warn("server {peer} is busy: another client holds the tunnel; retrying",
                      peer=conn.peer)

    def control_lost(self, conn: TunnelConnection) -> None:
        if conn is self.session:
            self.session, self.control = None, None
            self.session_fingerprint = self.session_id = b""
            self.session_keys = None
            self.pool.stop()
            for multiplexed in (self.http2, self.quic):
                if multiplexed is not None:
                    multiplexed.close()
            self.http2 = self.quic = None
            if not self.stopping:
                self.log.warn("tunnel to {peer} closed; reconnecting", peer=conn.peer)

    # -- data connections ------------------------------------------------

    def _control_factory(self) -> Any:
        """TCP; or with type=2 on this URL a WebSocket (a server behind an HTTP proxy),
        in TLS from the start when this client asks for TLS."""
        first = dialed(self, Kind.CONTROL)
        if self.config.type != 2:
            return QuietFactory(TunnelConnection, self.clock, first)
        least = self.config.required_tls
        return self._websocket(least, self.config.path,
                               lambda: TunnelConnection(self.clock, first),
                               self._websocket_failed)

    def _websocket(self, tls_mode: int, path: str, make_inner: Callable[[], Any],
                   on_failure: Callable[[str], None] | None = None) -> Any:
        return carriers.WebSocketDialing(
            self.tls_creator(tls_mode) if tls_mode else None,
            self.config.sni or self.config.tunnel.host, self.config.tunnel.port, path,
            make_inner, on_failure)

    def _websocket_failed(self, why: str) -> None:
        if not self.stopping and self._tls_throttle.allow() is not None:
            self.log.warn("the tunnel's WebSocket at {server}{path} did not open: {why}; "
                          "retrying", server=self.config.tunnel, path=self.config.path,
                          why=why)

    def _quic_pool(self, conn: TunnelConnection, tls_mode: int) -> Any:
        """type=1: data connections as streams of a QUIC connection to the port number
        of the control connection, at the address it reached (so no second lookup)."""
        from nodepass.tunnel import quicstream

        server = conn.transport.getPeer()
        name = self.config.sni or self.config.tunnel.host
        return quicstream.QuicPool(
            self.clock, (server.host, server.port),
            lambda: quicstream.client_configuration(tls_mode, name, self.config.ca),
            lambda: TunnelConnection(self.clock, dialed(
                self, Kind.DATA, (self.session_id, self.session_keys))))

    def _dial_data(self) -> Deferred[TunnelConnection]:
        assert self.session_keys is not None
        if self.data_type == 3 and self.http2 is not None:
            return self.http2.dial()
        if self.data_type == 1 and self.quic is not None:
            return self.quic.dial()
        first = dialed(self, Kind.DATA, (self.session_id, self.session_keys))
        if self.data_type == 2:
            # (a client that opens its control connection as a WebSocket opens every one
            # in the same TLS: pinned with tls=1, verified with tls=2)
            outer = self.config.required_tls \
                if self.config.type == 2 and self.config.required_tls else self.session_tls
            factory = self._websocket(outer, self.data_path,
                                      lambda: TunnelConnection(self.clock, first))
        else:
            factory = QuietFactory(TunnelConnection, self.clock, first)
        return self.endpoint.connect(factory).addCallback(lambda conn: conn.ready)

    def launched(self, conn: TunnelConnection, launch: Launch) -> None:
        """The server launched one of our pooled connections (reverse mode)."""
        if self.forward:
            raise ProtocolError("LAUNCH from the server, but the tunnel is in forward mode")
        self.pool.taken(conn)
        self.egress.launched(conn, launch)

    def pooled_lost(self, conn: TunnelConnection) -> None:
        self.pool.discard(conn)

    # -- forward mode: users arrive here --------------------------------

    def _unavailable(self) -> str | None:
        if self.session is None:
            return f"no tunnel session (connecting to server {self.config.tunnel})"
        return None

    @property
    def forward(self) -> bool:
        return self.mode == "forward"

    def _set_mode(self, mode: str) -> None:
        was_forward, self.mode = self.forward, mode
        if self.forward == was_forward:
            return
        if not self.forward:
            self.log.info("server is in reverse mode: no longer listening on {target}",
                          target=self.config.target)
            for listener in self.listeners:
                listener.disownServiceParent()
            self.listeners = []
            return
        if self.config.more_targets:
            self.fatal("the server is in forward mode, where the client listens on its "
                        "target address: give one address, not a list")
            return
        self.log.info("server is in forward mode: users connect to {target} here",
                      target=self.config.target)
        self.listeners = self.forward_listeners(self)
        for listener in self.listeners:
            listener.setServiceParent(self)

    def fatal(self, message: str) -> None:
        if self.on_fatal is not None:
            self.on_fatal(message)
        else:
            self.log.error("{text}", text=message)

    # -- reporting and lifecycle -----------------------------------------

    def report(self) -> Report:
        return snapshot("connecting", len(self.pool.idle), self.control, self.flows, self.mode,
                        TRANSPORTS[self.data_type])

    def startService(self) -> None:
        if self.config.tunnel_key is None:
            self.log.warn("no key in the URL: the tunnel key is the port in hex, which anyone "
                          "can guess; set one as client://KEY@host:port/...")
        self.log.info("client for server {server}, target {target}",
                      server=self.config.tunnel,
                      target=format_targets(self.config.targets))
        super().startService()

    def stopService(self) -> Deferred[Any]:
        self.stopping = True
        if self.control is not None:
            self.control.goodbye()
        stopped = super().stopService()
        self.pool.stop()
        self.ingress.close_all()
        return gatherResults([stopped, self.flows.close_all()])
