"""Server mode: the tunnel listener, and either the target listener (reverse) or
the target dialer (forward).

The client's control connection and its pooled data connections all arrive on
the tunnel port.  In reverse mode users arrive on the target port; each takes
one idle data connection, which is launched (LAUNCH frame) and relayed until
either side closes (ingress.py).  In forward mode the client launches them and
the server dials its target (egress.py).  Without a client session, users are
turned away at once.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred

from nodepass import __version__, logs
from nodepass.stats import Report, snapshot
from nodepass.tls import ServerCredentials, fingerprint_text
from nodepass.tunables import Tunables
from nodepass.tunnel import carriers, wire
from nodepass.tunnel.attempts import Attempts
from nodepass.tunnel.channel import QuietFactory
from nodepass.tunnel.connection import TunnelConnection, accepted
from nodepass.tunnel.control import ControlSession
from nodepass.tunnel.egress import Egress
from nodepass.tunnel.flows import Flows
from nodepass.tunnel.handshake import ServerHandshake, SessionKeys
from nodepass.tunnel.ingress import Ingress
from nodepass.tunnel.pool import POOL_WAIT_TIMEOUT, IdlePool
from nodepass.tunnel.targets import TargetDialer
from nodepass.tunnel.wire import Kind, Launch, ProtocolError
from nodepass.url import TRANSPORTS, Address, ServerConfig, derived_key, format_targets

REVERSE, FORWARD = "reverse", "forward"


class _TunnelFactory(QuietFactory):
    """The tunnel port's connections.  While key attempts are over their limits, a
    connection from anyone but the session's client is closed as it is accepted: a
    handshake flood then costs an accept, not a protocol, a TLS handshake or a PAKE."""

    def __init__(self, tunnel: ServerTunnel) -> None:
        super().__init__(TunnelConnection, tunnel.clock, accepted(tunnel))
        self.tunnel = tunnel

    def buildProtocol(self, addr: Any) -> Any:
        host = getattr(addr, "host", "")
        if not self.tunnel.session_host(host) and self.tunnel.attempts.saturated(host):
            self.tunnel.attempts.refused += 1
            return None
        return super().buildProtocol(addr)


class ServerTunnel(Service):
    """The server's state: the client session, the idle pool, the live relays."""

    log = logs.logger("nodepass")

    def __init__(self, reactor: Any, config: ServerConfig, tunables: Tunables,
                 credentials: ServerCredentials | None = None,
                 dialer: TargetDialer | None = None) -> None:
        self.clock = reactor
        self.config = config
        self.tunables = tunables
        self.key = derived_key(config).encode()
        self.tls_mode = config.tls
        self.credentials = credentials
        self.session: TunnelConnection | None = None
        self.control: ControlSession | None = None
        self.session_id = b""
        self.keys: SessionKeys | None = None  # the live session's
        self.max_pool = config.max or tunables.max_pool_capacity
        self.pool = IdlePool(reactor, self.max_pool, POOL_WAIT_TIMEOUT, self._request_more)
        self.flows = Flows.for_config(reactor, tunables, config)
        self.ingress = Ingress(self.flows, self.pool, self._unavailable, config.proxy)
        dialer = dialer or TargetDialer.for_config(reactor, config, tunables)
        self.egress = Egress(self.flows, dialer, config.proxy, config.notcp, config.noudp)
        # mode=0 starts as reverse and turns forward if the target cannot be bound (a
        # list of targets is only ever dialed).
        self.mode = FORWARD if config.mode == 2 or config.more_targets else REVERSE
        self.stopping = False
        self.attempts = Attempts(reactor)
        self._auth_throttle = logs.Throttle(reactor)
        self._attempt_throttle = logs.Throttle(reactor)

    # -- factories -------------------------------------------------------

    def tunnel_factory(self) -> Any:
        """What the tunnel port runs: the tunnel connection itself (type=0), or a
        sniffer that also takes WebSockets at ``path`` (type=2)."""
        return carriers.accepting(_TunnelFactory(self), self, self.config.type,
                                  self.config.path)

    def quic_listener(self) -> Any:
        """type=1: what receives QUIC on the tunnel port's number over UDP (the control
        connection stays TCP); None for the other types."""
        if self.config.type != 1:
            return None
        from nodepass.tunnel.quicstream import QuicListener

        return QuicListener(self.clock, self, lambda: TunnelConnection(self.clock,
                                                                       accepted(self)))

    def target_factory(self) -> QuietFactory:
        return self.ingress.user_factory()

    @property
    def udp(self) -> Any:
        return self.ingress.udp

    def cannot_bind_target(self, why: str) -> None:
        """mode=0 and the target address is not ours to listen on: forward mode."""
        self.mode = FORWARD
        self.log.info("mode=0: {why}: so forward mode", why=why)

    def announce_mode(self, target: Address) -> None:
        """Log the mode in force once the listeners are up (the mode=0 choice included);
        ``target`` is where users connect in reverse mode (its port as listened on)."""
        targets = format_targets(self.config.targets)
        if self.mode == FORWARD:
            self.log.info("forward mode: users connect to the client's target address; this "
                          "server dials {targets}", targets=targets)
        else:
            self.log.info("reverse mode: users connect to {target} here; the client dials its "
                          "target", target=target)

    def _unavailable(self) -> str | None:
        return "no client is connected to the tunnel" if self.session is None else None

    # -- the client session ----------------------------------------------

    def admit(self, conn: TunnelConnection) -> bool:
        """May ``conn``'s peer try the key now (attempts.py)?  Refusals are logged,
        throttled."""
        why = self.attempts.admit(conn.peer_host)
        if why is None:
            return True
        self._attempt_throttle.warn(self.log, "refused a key attempt from {peer}: {why}",
                                    peer=conn.peer, why=why)
        return False

    def auth_failed(self, conn: TunnelConnection) -> None:
        self.attempts.failed(conn.peer_host)
        self._auth_throttle.warn(self.log, "authentication failed from {peer}: a wrong key, "
                                           "or not a nodepass client", peer=conn.peer)

    def session_host(self, host: str) -> bool:
        """Is ``host`` where the live session's client is?  (Its data connections are
        never turned away for others' attempts.)"""
        return self.session is not None and self.session.peer_host == host

    def session_keys(self, session_id: bytes) -> SessionKeys | None:
        """The keys a data connection naming ``session_id`` authenticates with."""
        if self.session is None or session_id != self.session_id:
            return None
        return self.keys

    def authenticated(self, conn: TunnelConnection, handshake: ServerHandshake) -> None:
        if handshake.kind is Kind.CONTROL:
            self._open_session(conn, handshake)
        else:
            self._add_data(conn, handshake)

    def _open_session(self, conn: TunnelConnection, handshake: ServerHandshake) -> None:
        if self.stopping:
            conn.abort()
            return
        if self.session is not None:
            self.log.warn("refused client {peer}: the tunnel is held by {holder}",
                          peer=conn.peer, holder=self.session.peer)
            conn.refuse_busy()
            return
        self.session_id = os.urandom(wire.SESSION_ID_SIZE)
        self.keys = handshake.keys
        settings = {
            "version": __version__,
            "heartbeat_ms": int(self.tunables.report_interval * 1000),
            "max_pool": self.max_pool,
            "type": self.config.type,
            "path": self.config.path,
            "mode": self.mode,
        }
        control = ControlSession(
            self.clock, self.tunables.report_interval, conn.send_signal,
            on_dead=lambda: self._session_dead(conn),
            on_goodbye=lambda reason: conn.close(),
        )
        conn.open_control(control, handshake.welcome(self.session_id, settings))
        self.session, self.control = conn, control
        control.start()
        self.log.info("client {peer} connected: tunnel session open", peer=conn.peer)

    def _session_dead(self, conn: TunnelConnection) -> None:
        self.log.warn("client {peer} missed its heartbeats: closing the session", peer=conn.peer)
        conn.abort()

    def _add_data(self, conn: TunnelConnection, handshake: ServerHandshake) -> None:
        if self.session is None or handshake.session_id != self.session_id:
            self.log.debug("data connection from {peer} names no live session", peer=conn.peer)
            conn.close()
            return
        conn.pool(handshake.welcome())
        if not self.pool.add(conn):
            conn.close()

    def launched(self, conn: TunnelConnection, launch: Launch) -> None:
        """The client launched one of its pooled connections (forward mode)."""
        if self.mode != FORWARD:
            raise ProtocolError("LAUNCH from the client, but this server is in reverse mode")
        self.pool.discard(conn)
        self.egress.launched(conn, launch)

    def _request_more(self, waiting: int) -> None:
        if self.control is not None:
            self.control.demand(waiting)

    def pooled_lost(self, conn: TunnelConnection) -> None:
        self.pool.discard(conn)

    def control_lost(self, conn: TunnelConnection) -> None:
        if conn is self.session:
            self.session, self.control = None, None
            self.session_id, self.keys = b"", None
            self.pool.flush()
            if not self.stopping:
                self.log.warn("client {peer} disconnected: tunnel session closed",
                              peer=conn.peer)

    # -- reporting and lifecycle -----------------------------------------

    def report(self) -> Report:
        return snapshot("waiting", len(self.pool.idle), self.control, self.flows, self.mode,
                        TRANSPORTS[self.config.type])

    def startService(self) -> None:
        super().startService()
        if self.config.tunnel_key is None:
            self.log.warn("no key in the URL: the tunnel key is the port in hex, which anyone "
                          "can guess; set one as server://KEY@host:port/...")
        if self.config.tls_raised:
            self.log.warn("type=1 (QUIC) is TLS 1.3 by design: tls=0 raised to tls=1")
        if self.credentials is None:
            self.log.info("tls=0: tunnel traffic is not encrypted")
        else:
            self.log.info("tls={mode}: certificate fingerprint {fp}", mode=self.tls_mode,
                          fp=fingerprint_text(self.credentials.credentials.fingerprint))

    def stopService(self) -> Deferred[None]:
        super().stopService()
        self.stopping = True
        if self.session is not None:
            if self.control is not None:
                self.control.goodbye()
            self.session.close()
        self.pool.flush()
        self.ingress.close_all()
        return self.flows.close_all()

