"""Server mode: the tunnel listener, the target listener, and what joins them.

The client's control connection and its pooled data connections all arrive on
the tunnel port.  Users arrive on the target port; each takes one idle data
connection, which is launched (LAUNCH frame) and relayed until either side
closes.  Without a client session, users are turned away at once.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from nodepass import __version__, logs
from nodepass.stats import Report, Traffic, snapshot
from nodepass.tls import ServerCredentials, fingerprint_text
from nodepass.tunables import Tunables
from nodepass.tunnel import splice, wire
from nodepass.tunnel.channel import (
    HANDSHAKE_TIMEOUT,
    FramedConnection,
    QuietFactory,
    peer_of,
    tune,
)
from nodepass.tunnel.control import ControlSession
from nodepass.tunnel.handshake import AuthenticationError, ServerHandshake
from nodepass.tunnel.pool import IdlePool
from nodepass.tunnel.relay import Relay, RelayProtocol, RelaySet
from nodepass.tunnel.udp import ServerUdp, UdpSession
from nodepass.tunnel.wire import Frame, Goodbye, Kind, Proto, ProtocolError, Type
from nodepass.url import ServerConfig, derived_key

POOL_WAIT_TIMEOUT = 5.0


class TunnelConnection(FramedConnection):
    """A connection accepted on the tunnel port: handshake, then control or data."""

    expect_preamble = True

    def __init__(self, tunnel: ServerTunnel) -> None:
        super().__init__()
        self.tunnel = tunnel
        self.state = "hello"
        self.handshake = ServerHandshake(tunnel.key, tunnel.tls_mode, os.urandom(wire.NONCE_SIZE))
        self.control: ControlSession | None = None
        self.udp: UdpSession | None = None
        self.unflushed = False  # bytes sit in Twisted's buffer: no splicing for this one
        self._timeout: Any = None

    def connectionMade(self) -> None:
        super().connectionMade()
        self._timeout = self.tunnel.clock.callLater(HANDSHAKE_TIMEOUT, self._handshake_timeout)

    def _handshake_timeout(self) -> None:
        self._timeout = None
        self.tunnel.log.debug("tunnel connection from {peer}: no handshake in {t}s",
                              peer=self.peer, t=HANDSHAKE_TIMEOUT)
        self.abort()

    def frame_received(self, frame: Frame) -> None:
        if self.state == "control":
            assert self.control is not None
            self.control.frame_received(frame)
        elif self.state == "udp":
            self.udp.from_tunnel(frame.payload)
        elif self.state == "hello" and frame.type is Type.HELLO:
            credentials = self.tunnel.credentials
            if credentials is None:
                self.send(self.handshake.on_hello(frame.payload))
            else:
                options, self.handshake.binding = credentials.current()
                self.send(self.handshake.on_hello(frame.payload))
                if self.decoder.buffered:
                    raise ProtocolError("data sent before TLS started")
                self.transport.startTLS(options)
                self.send(self.handshake.attest())
            self.state = "auth"
        elif self.state == "auth" and frame.type is Type.AUTH:
            self._authenticate(frame.payload)
        else:
            raise ProtocolError(f"unexpected {frame.type.name} frame while {self.state}")

    def _authenticate(self, payload: bytes) -> None:
        try:
            self.handshake.on_auth(payload)
        except AuthenticationError:
            self.tunnel.auth_failed(self.peer)
            self.abort()
            return
        self._timeout.cancel()
        self._timeout = None
        self.state = "authenticated"
        if self.handshake.kind is Kind.CONTROL:
            self.tunnel.open_session(self)
        else:
            self.tunnel.add_data(self)

    def ended(self, reason: Failure) -> None:
        if self._timeout is not None:
            self._timeout.cancel()
            self._timeout = None
        if self.control is not None:
            self.control.stop()
        if self.udp is not None:
            self.udp.close()
        self.tunnel.connection_ended(self)


class UserConnection(RelayProtocol):
    """A connection accepted on the target port, waiting for then using a data connection."""

    def __init__(self, tunnel: ServerTunnel) -> None:
        self.tunnel = tunnel
        self.waiter: Any = None
        self.gone = False

    def connectionMade(self) -> None:
        tune(self.transport, keepalive=False)
        self.tunnel.user_arrived(self)

    def before_relay_lost(self, reason: Failure) -> None:
        self.gone = True
        self.tunnel.user_left(self)


class ServerTunnel(Service):
    """The server's state: the client session, the idle pool, the live relays."""

    log = logs.logger("nodepass")

    def __init__(self, reactor: Any, config: ServerConfig, tunables: Tunables,
                 credentials: ServerCredentials | None = None) -> None:
        self.clock = reactor
        self.config = config
        self.tunables = tunables
        self.key = derived_key(config).encode()
        self.tls_mode = config.tls
        self.credentials = credentials
        self.session: TunnelConnection | None = None
        self.session_id = b""
        self.pool = IdlePool(reactor, tunables.max_pool_capacity, POOL_WAIT_TIMEOUT,
                             self._request_more)
        self.relays = RelaySet()
        self.traffic = Traffic()
        self.udp = ServerUdp(self)
        self.stopping = False
        self._auth_throttle = logs.Throttle(reactor)
        self._refuse_throttle = logs.Throttle(reactor)

    # -- factories -------------------------------------------------------

    def tunnel_factory(self) -> QuietFactory:
        return QuietFactory(TunnelConnection, self)

    def target_factory(self) -> QuietFactory:
        return QuietFactory(UserConnection, self)

    # -- the client session ----------------------------------------------

    def auth_failed(self, peer: str) -> None:
        self._auth_throttle.warn(self.log, "authentication failed from {peer}", peer=peer)

    def open_session(self, conn: TunnelConnection) -> None:
        if self.stopping:
            conn.abort()
            return
        if self.session is not None:
            self.log.warn("refused client {peer}: the tunnel is held by {holder}",
                          peer=conn.peer, holder=self.session.peer)
            conn.send(wire.frame(Type.BUSY))
            conn.close()
            return
        self.session_id = os.urandom(wire.SESSION_ID_SIZE)
        settings = {
            "version": __version__,
            "heartbeat_ms": int(self.tunables.report_interval * 1000),
            "max_pool": self.tunables.max_pool_capacity,
        }
        conn.send(conn.handshake.welcome(self.session_id, settings))
        conn.state = "control"
        conn.control = ControlSession(
            self.clock, self.tunables.report_interval, conn.send,
            on_dead=lambda: self._session_dead(conn),
            on_goodbye=lambda reason: conn.close(),
        )
        self.session = conn
        conn.control.start()
        self.log.info("client {peer} connected: tunnel session open", peer=conn.peer)

    def _session_dead(self, conn: TunnelConnection) -> None:
        self.log.warn("client {peer} missed its heartbeats: closing the session", peer=conn.peer)
        conn.abort()

    def add_data(self, conn: TunnelConnection) -> None:
        if self.session is None or conn.handshake.session_id != self.session_id:
            self.log.debug("data connection from {peer} names no live session", peer=conn.peer)
            conn.close()
            return
        welcome = conn.handshake.welcome()
        # Written straight to the socket when it is plain TCP: a waiting user may launch
        # this connection at once, and the spliced LAUNCH must not overtake the WELCOME.
        sent = splice.send_now(conn.transport, welcome) if splice.plain_tcp(
            conn.transport) else 0
        if sent < len(welcome):
            conn.send(welcome[sent:])
            conn.unflushed = True
        conn.state = "idle"
        if not self.pool.add(conn):
            conn.close()

    def _request_more(self, waiting: int) -> None:
        if self.session is not None:
            self.session.send(wire.demand(waiting))

    def connection_ended(self, conn: TunnelConnection) -> None:
        if conn is self.session:
            self.session = None
            self.session_id = b""
            self.pool.flush()
            if not self.stopping:
                self.log.warn("client {peer} disconnected: tunnel session closed",
                              peer=conn.peer)
        else:
            self.pool.discard(conn)

    # -- users -----------------------------------------------------------

    def _refuse(self, user: UserConnection, why: str) -> None:
        self._refuse_throttle.warn(self.log, "closed connection from {peer}: {why}",
                                   peer=peer_of(user.transport), why=why)
        user.transport.loseConnection()

    def user_arrived(self, user: UserConnection) -> None:
        if self.stopping:
            user.transport.abortConnection()
        elif self.session is None:
            self._refuse(user, "no client is connected to the tunnel")
        elif self.connections_in_use() >= self.tunables.semaphore_limit:
            self._refuse(user, f"SEMAPHORE_LIMIT ({self.tunables.semaphore_limit}) reached")
        else:
            user.transport.pauseProducing()
            user.waiter = self.pool.take(lambda conn: self._launch(user, conn),
                                         lambda: self._no_pool(user))

    def connections_in_use(self) -> int:
        """What SEMAPHORE_LIMIT counts: relays, users waiting, UDP sessions."""
        return len(self.relays) + len(self.pool.waiters) + len(self.udp.sessions)

    def user_left(self, user: UserConnection) -> None:
        if user.waiter is not None:
            self.pool.cancel(user.waiter)
            user.waiter = None

    def _no_pool(self, user: UserConnection) -> None:
        user.waiter = None
        if self.stopping:
            why = "the server is shutting down"
        elif self.session is None:
            why = "the tunnel session closed"
        else:
            why = f"no pooled connection within {POOL_WAIT_TIMEOUT:g}s"
        self._refuse(user, why)

    def _launch(self, user: UserConnection, conn: TunnelConnection) -> None:
        user.waiter = None
        if user.gone:
            if not self.pool.add(conn):  # never launched, so still fresh
                conn.close()
            return
        conn.state = "relay"
        conn.framing = False
        launch = wire.launch(Proto.TCP, peer_of(user.transport))
        if (splice.plain_tcp(conn.transport) and splice.plain_tcp(user.transport)
                and not conn.unflushed):
            sent = splice.send_now(conn.transport, launch)
            if sent == len(launch):
                fast = splice.SpliceRelay(self.clock, user, conn, self.traffic.add_tcp_in,
                                          self.traffic.add_tcp_out, self.relays.discard)
                self.relays.add(fast)
                fast.start()
                return
            launch = launch[sent:]
        conn.send(launch)
        if self.credentials is not None:
            conn.frame_stream()
        relay = Relay(user, conn, self.traffic.add_tcp_in, self.traffic.add_tcp_out,
                      self.relays.discard)
        self.relays.add(relay)
        relay.start()

    # -- reporting and lifecycle -----------------------------------------

    def report(self) -> Report:
        control = self.session.control if self.session is not None else None
        return snapshot("connected" if control is not None else "waiting", len(self.pool.idle),
                        len(self.relays), control.rtt_ms if control is not None else None,
                        self.traffic, self.udp.active,
                        self.udp.drops.oversize + self.udp.drops.overload)

    def startService(self) -> None:
        super().startService()
        if self.config.tunnel_key is None:
            self.log.warn("no key in the URL: the tunnel key is the port in hex, which anyone "
                          "can guess; set one as server://KEY@host:port/...")
        if self.credentials is None:
            self.log.info("tls=0: tunnel traffic is not encrypted")
        else:
            self.log.info("tls={mode}: certificate fingerprint {fp}", mode=self.tls_mode,
                          fp=fingerprint_text(self.credentials.credentials.fingerprint))

    def stopService(self) -> Deferred[None]:
        super().stopService()
        self.stopping = True
        if self.session is not None:
            self.session.send(wire.goodbye(Goodbye.SHUTDOWN))
            self.session.close()
        self.pool.flush()
        self.udp.close_all()
        return self.relays.drain(self.clock, self.tunables.shutdown_timeout)

