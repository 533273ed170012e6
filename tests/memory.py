"""In-memory helpers: a server tunnel on a Clock, fake peers on StringTransports."""

from __future__ import annotations

import os

from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport

from nodepass.tunables import Tunables
from nodepass.tunnel import wire
from nodepass.tunnel.handshake import AuthenticationError, ClientHandshake, Opener, Sealer
from nodepass.tunnel.server import ServerTunnel
from nodepass.tunnel.wire import FrameDecoder, Kind, Proto, Type
from nodepass.url import Address, ServerConfig

CONTROL_TYPES = frozenset({Type.PING, Type.PONG, Type.DEMAND, Type.GOODBYE})


class HalfCloseTransport(StringTransport):
    """A StringTransport that also records half-closes."""

    write_closed = False

    def loseWriteConnection(self) -> None:
        self.write_closed = True


def server_tunnel(key: str = "k", controls: dict | None = None,
                  **tunables) -> tuple[ServerTunnel, Clock]:
    """A ServerTunnel on a Clock (a MemoryReactorClock when it dials: forward mode)."""
    controls = controls or {}
    clock = MemoryReactorClock() if controls.get("mode") == 2 else Clock()
    config = ServerConfig(tunnel=Address("127.0.0.1", 1), target=Address("127.0.0.1", 2),
                          tunnel_key=key, **controls)
    tunables.setdefault("report_interval", 1.0)
    return ServerTunnel(clock, config, Tunables(**tunables)), clock


def transport_for(port: int) -> HalfCloseTransport:
    return HalfCloseTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", port))


class FakeClient:
    """One tunnel connection to a ServerTunnel, driven by hand with a real
    ClientHandshake: what a client sends, frame by frame."""

    def __init__(self, tunnel: ServerTunnel, key: str = "k", kind: Kind = Kind.CONTROL,
                 session: tuple | None = None, port: int = 40000) -> None:
        self.tunnel = tunnel
        self.protocol = tunnel.tunnel_factory().buildProtocol(None)
        self.transport = transport_for(port)
        self.protocol.makeConnection(self.transport)
        self.handshake = ClientHandshake(key.encode(), kind, os.urandom(32), session)
        self.decoder = FrameDecoder()
        self.sealer: Sealer | None = None
        self.opener: Opener | None = None

    def send(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    def frames(self):
        self.decoder.feed(self.transport.value())
        self.transport.clear()
        out = []
        while (frame := self.decoder.next_frame()) is not None:
            out.append(frame)
        return out

    def signals(self):
        """The server's control frames since the last call, their seals checked."""
        assert self.opener is not None
        return [self.opener.open(f) if f.type in CONTROL_TYPES else f for f in self.frames()]

    def authenticate(self) -> list:
        """Run the handshake; return the frames the server sent after AUTH.  A client
        with a wrong key (an attacker's) sends an AUTH it made up, where a real client
        gives up on the server's confirmation."""
        self.send(self.handshake.hello())
        frames = self.frames()
        if not frames:
            return []  # closed at once: a data connection for no live session
        (challenge,) = frames
        assert challenge.type is Type.CHALLENGE
        self.handshake.on_challenge(challenge.payload)
        if self.handshake.kind is Kind.CONTROL:
            self.send(self.handshake.pake())
            frames = self.frames()
            if not frames:
                return []  # refused before any work (attempt limits)
            (pake,) = frames
            assert pake.type is Type.PAKE, pake
            try:
                auth = self.handshake.on_pake(pake.payload, b"")
            except AuthenticationError:
                auth = wire.auth(os.urandom(wire.MAC_SIZE))
            self.send(auth)
        else:
            self.send(self.handshake.auth())
        return self.frames()

    def welcomed(self, welcome) -> None:
        self.settings = self.handshake.on_welcome(welcome.payload)
        keys = self.handshake.keys
        if self.handshake.kind is Kind.CONTROL:
            self.sealer, self.opener = Sealer(keys.client_control), Opener(keys.server_control)
        self.launches = self.handshake.launches() if self.handshake.kind is Kind.DATA else None

    def signal(self, kind: Type, payload: bytes) -> None:
        """A control frame, sealed as a real client seals it."""
        assert self.sealer is not None
        self.send(self.sealer.seal(kind, payload))

    def launch(self, proto: Proto, source: str, dest: str = "", proxy: int = 0) -> bytes:
        """A LAUNCH frame sealed for this data connection (to send, or to tamper with)."""
        return self.launches.seal(wire.launch_fields(proto, source, dest, proxy))

    def lose(self) -> None:
        from twisted.internet.error import ConnectionDone
        from twisted.python.failure import Failure

        self.protocol.connectionLost(Failure(ConnectionDone()))

    @property
    def closed(self) -> bool:
        return self.transport.disconnecting


def open_session(tunnel: ServerTunnel, key: str = "k") -> FakeClient:
    control = FakeClient(tunnel, key)
    welcome, *pings = control.authenticate()
    assert welcome.type is Type.WELCOME and all(p.type is Type.PING for p in pings)
    control.welcomed(welcome)
    for ping in pings:  # sealed after the WELCOME: their seals count in order
        control.opener.open(ping)
    return control


def add_data(tunnel: ServerTunnel, control: FakeClient, port: int) -> FakeClient:
    data = FakeClient(tunnel, kind=Kind.DATA, session=control.handshake.session(), port=port)
    welcome, *data.early = data.authenticate()
    data.welcomed(welcome)
    return data


def udp_over_connection(clock, deliver, idle_timeout, max_size, count_in, count_out, drops,
                        on_end, rate_in=None, rate_out=None):
    """A UdpSession carried by a real TunnelConnection (in its datagrams phase) on a
    StringTransport; the connection closes when the session ends."""
    from nodepass.tunnel.connection import AwaitingSession, TunnelConnection
    from nodepass.tunnel.udp import UdpSession

    conn = TunnelConnection(clock, lambda c: AwaitingSession(c, b""))
    conn.makeConnection(transport_for(1))

    def ended(session):
        conn.close()
        on_end(session)

    session = UdpSession(clock, conn.send_datagram, deliver, idle_timeout, max_size, count_in,
                         count_out, drops, ended, rate_in, rate_out)
    conn.carry_udp(session)
    return conn, session


def connect_user(tunnel: ServerTunnel, port: int = 50000):
    user = tunnel.target_factory().buildProtocol(None)
    transport = transport_for(port)
    user.makeConnection(transport)
    return user, transport
