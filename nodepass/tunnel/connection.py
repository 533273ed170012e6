"""A tunnel connection's life, as one explicit state machine (docs/how-it-works.md).

:class:`TunnelConnection` is a thin protocol: it turns what its transport says
into inputs of its current state, and its methods are the only way anything
else — the server and client tunnels, ingress, egress, UDP, the relay — changes a
connection.  Each state is an object of one class below that owns what its phase
may do::

    handshake (the server's or the client's)
        -> control        the session's signal channel (heartbeats, DEMAND, GOODBYE)
        -> pooled         an idle data connection, waiting to be launched
              -> launched     LAUNCH(TCP) crossed; the stream waits for its relay
                    -> streaming  joined to a relay: the stream's bytes as they are
              -> datagrams    LAUNCH(UDP) crossed: a UDP session's DATAGRAM frames
        -> busy           the server is held by another client (client side)
    any -> closed

An input the current state does not take is a protocol error: one log line, and
this connection (only this one) is aborted.  Plain classes rather than Automat:
the stream and datagram states sit on the data path, where one method call per
chunk is all a state may cost, and each state carries its own data (a decoder,
held bytes, a relay, a session).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from nodepass import logs
from nodepass.timers import cancelled
from nodepass.tls import fingerprint_text, peer_fingerprint
from nodepass.tunnel import splice, tls_transport, wire
from nodepass.tunnel.channel import peer_of, tune, write_through
from nodepass.tunnel.handshake import (
    AuthenticationError,
    ClientHandshake,
    Launches,
    Opener,
    Sealer,
    ServerHandshake,
)
from nodepass.tunnel.relay import RelayProtocol
from nodepass.tunnel.wire import (
    DATAGRAM_TYPES,
    Frame,
    FrameDecoder,
    Kind,
    Proto,
    ProtocolError,
    Type,
)

HANDSHAKE_TIMEOUT = 10.0


class TunnelConnection(RelayProtocol):
    """One connection on the tunnel port, at either end; see the module's docstring."""

    log = logs.logger("nodepass")

    def __init__(self, clock: Any, first: Callable[[TunnelConnection], State]) -> None:
        self.clock = clock
        self._first = first
        self.state: State = Closed(self)
        self.peer = "?"
        self.peer_host = "?"  # its IP address, for the server's attempt limits
        self.tls = False  # TLS was started on this connection
        self.unflushed = False  # bytes wait in Twisted's write buffer: no splice
        self.closing = False  # closed or aborted by this end: inputs are ignored
        self.ready: Deferred[TunnelConnection] | None = None  # a client's data dial

    # -- the transport's events, as inputs --------------------------------

    def connectionMade(self) -> None:
        self.peer = peer_of(self.transport)
        self.peer_host = getattr(self.transport.getPeer(), "host", "?")
        tune(self.transport)
        self._become(self._first(self))

    def dataReceived(self, data: bytes) -> None:
        if not self.closing:
            self.state.data(data)

    def readConnectionLost(self) -> None:
        if not self.closing:
            self.state.eof()

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure) -> None:
        """Gone: the phase it was in says what that means (then it is closed)."""
        state = self.state
        self._become(Closed(self))
        state.lost(reason)

    # -- inputs from the tunnel's owners ----------------------------------

    def open_control(self, session: Any, welcome: bytes = b"") -> None:
        """Authenticated as the control connection: ``session`` (a ControlSession)
        hears its frames; a server sends its WELCOME first."""
        self.state.open_control(session, welcome)

    def refuse_busy(self) -> None:
        """The server is held by another client: say BUSY and close."""
        self.state.refuse_busy()

    def pool(self, welcome: bytes = b"") -> None:
        """Authenticated as a data connection: idle until launched; a server sends its
        WELCOME first (straight to the socket, so a LAUNCH right after cannot overtake
        it on the splice path)."""
        self.state.pool(welcome)

    def launch_tcp(self, source: str, dest: str, proxy: int) -> bytes:
        """This end launches it for a TCP user: the LAUNCH frame to write first."""
        return self.state.launch_tcp(source, dest, proxy)

    def launch_udp(self, source: str, dest: str) -> None:
        """This end launches it for a UDP source (LAUNCH is written now)."""
        self.state.launch_udp(source, dest)

    def carry_udp(self, session: Any) -> None:
        """From now on it carries ``session``'s datagrams both ways."""
        self.state.carry_udp(session)

    def dialing(self, attempt: Deferred[Any]) -> None:
        """Its target is being dialed: if it goes first, the dial is cancelled."""
        self.state.dialing(attempt)

    def take_held(self) -> tuple[bytes, bool]:
        """What the other end sent after LAUNCH before the relay was joined: (bytes,
        whether its stream already ended)."""
        return self.state.take_held()

    def join(self, relay: Any) -> None:
        self.state.join(relay)

    def spliceable(self) -> bool:
        return self.state.spliceable()

    def send(self, data: bytes) -> None:
        self.transport.write(data)

    def send_signal(self, kind: Type, payload: bytes) -> None:
        """A control frame (sealed with the session's key) on the control channel."""
        self.state.send_signal(kind, payload)

    def send_stream(self, data: bytes) -> None:
        self.state.send_stream(data)

    def end_stream(self) -> None:
        self.state.end_stream()

    def send_datagram(self, payload: bytes) -> None:
        write_through(self.transport, wire.datagram(payload))

    def close(self) -> None:
        """Close after what is buffered is written; its phase hears the loss."""
        self.closing = True
        self.transport.loseConnection()

    def abort(self) -> None:
        self.closing = True
        self.transport.abortConnection()

    # -- within this module ----------------------------------------------

    def _become(self, state: State) -> None:
        self.state.leave()
        self.state = state
        state.enter()

    def _write_now(self, data: bytes) -> None:
        """Straight to the socket when it is plain TCP; the rest through Twisted."""
        sent = splice.send_now(self.transport, data) if splice.plain_tcp(self.transport) else 0
        if sent < len(data):
            self.transport.write(data[sent:])
            self.unflushed = True

    def protocol_error(self, why: str) -> None:
        self.log.warn("tunnel connection from {peer} closed: {why}", peer=self.peer, why=why)
        self.abort()


class State:
    """What a phase may do; every input it does not take is a protocol error."""

    name = "?"

    def __init__(self, conn: TunnelConnection) -> None:
        self.conn = conn

    def enter(self) -> None:
        pass

    def leave(self) -> None:
        pass

    def invalid(self, what: str) -> None:
        self.conn.protocol_error(f"{what} is not valid while {self.name}")

    # from the wire
    def data(self, data: bytes) -> None:
        self.invalid("data")

    def eof(self) -> None:
        self.conn.close()

    def lost(self, reason: Failure) -> None:
        pass

    # from the owners
    def open_control(self, session: Any, welcome: bytes) -> None:
        self.invalid("opening the control channel")

    def refuse_busy(self) -> None:
        self.invalid("refusing as busy")

    def pool(self, welcome: bytes) -> None:
        self.invalid("pooling")

    def launch_tcp(self, source: str, dest: str, proxy: int) -> bytes:
        self.invalid("a TCP launch")
        return b""

    def launch_udp(self, source: str, dest: str) -> None:
        self.invalid("a UDP launch")

    def carry_udp(self, session: Any) -> None:
        self.invalid("carrying UDP")
        session.close()

    def dialing(self, attempt: Deferred[Any]) -> None:
        attempt.cancel()

    def take_held(self) -> tuple[bytes, bool]:
        return b"", False

    def join(self, relay: Any) -> None:
        self.invalid("joining a relay")

    def spliceable(self) -> bool:
        return False

    def send_stream(self, data: bytes) -> None:
        pass  # the relay may still flush to a connection that just ended

    def send_signal(self, kind: Type, payload: bytes) -> None:
        pass  # a heartbeat may still fire as the control connection ends

    def end_stream(self) -> None:
        pass


class Framed(State):
    """A phase that speaks frames: bytes are decoded, each frame is an input."""

    def __init__(self, conn: TunnelConnection, decoder: FrameDecoder | None = None) -> None:
        super().__init__(conn)
        self.decoder = decoder or FrameDecoder()

    def data(self, data: bytes) -> None:
        conn, state = self.conn, self
        try:
            self.decoder.feed(data)
            # Frames that arrive together may span phases (WELCOME, then LAUNCH): each
            # goes to the state its predecessor left, until one stops speaking frames.
            while not conn.closing:
                frame = state.decoder.next_frame()
                if frame is None:
                    break
                state.frame(frame)
                state = conn.state  # type: ignore[assignment]
                if not isinstance(state, Framed):
                    break
        except ProtocolError as e:
            conn.protocol_error(str(e))

    def frame(self, frame: Frame) -> None:
        raise ProtocolError(f"unexpected {frame.type.name} frame while {self.name}")


class _Timed(Framed):
    """A handshake phase: it waits for one frame (``expects``), and the whole handshake
    must end within HANDSHAKE_TIMEOUT."""

    expects: Type | None = None

    def __init__(self, conn: TunnelConnection, decoder: FrameDecoder | None = None,
                 timer: Any = None) -> None:
        super().__init__(conn, decoder)
        self.timer = timer

    def enter(self) -> None:
        if self.timer is None:
            self.timer = self.conn.clock.callLater(HANDSHAKE_TIMEOUT, self.timed_out)

    def handed_on(self) -> Any:
        """The timer, for the next handshake phase (which must not arm another)."""
        timer, self.timer = self.timer, None
        return timer

    def leave(self) -> None:
        self.timer = cancelled(self.timer)

    def timed_out(self) -> None:
        self.timer = None
        self.conn.abort()

    def frame(self, frame: Frame) -> None:
        if frame.type is not self.expects:
            super().frame(frame)
        self.expected(frame)

    def expected(self, frame: Frame) -> None:
        """The one frame this phase waits for (``expects``) has come."""
        raise NotImplementedError

    def start_tls(self, context: Any, server_side: bool, hostname: str | None = None,
                  describe: Callable[[Any], str] = str, session: Any = None) -> None:
        """TLS from here on (the standard library's, on this very transport)."""
        carried_in_tls = getattr(self.conn.transport, "carrier_tls", None)
        if carried_in_tls is None:
            if self.decoder.buffered:  # (inside a carrier's TLS the rest is as safe)
                raise ProtocolError("data sent before TLS started")
            tls_transport.start_tls(self.conn.transport, context, server_side, hostname,
                                    describe, session)
        elif not carried_in_tls:  # a WebSocket: its TLS (wss) comes first, or not at all
            raise ProtocolError("TLS asked for inside a WebSocket that is not in TLS (wss)")
        self.conn.tls = True


# ---------------------------------------------------------------------------
# The server's handshake


class ServerHello(_Timed):
    """Accepted on the tunnel port: HELLO -> CHALLENGE (and TLS); then a control
    connection's PAKE, or a data connection's [ATTEST and] AUTH."""

    name = "waiting for HELLO"
    expects = Type.HELLO

    def __init__(self, conn: TunnelConnection, tunnel: Any) -> None:
        super().__init__(conn, FrameDecoder(expect_preamble=True))
        self.tunnel = tunnel
        self.handshake = ServerHandshake(tunnel.key, tunnel.tls_mode,
                                         os.urandom(wire.NONCE_SIZE), tunnel.session_keys)

    def timed_out(self) -> None:
        self.tunnel.log.debug("tunnel connection from {peer}: no handshake in {t:g}s",
                              peer=self.conn.peer, t=HANDSHAKE_TIMEOUT)
        super().timed_out()

    def expected(self, frame: Frame) -> None:
        credentials = self.tunnel.credentials
        if credentials is not None:
            context, self.handshake.binding = credentials.current()
        try:
            challenge = self.handshake.on_hello(frame.payload)
        except AuthenticationError as e:
            self.tunnel.log.debug("tunnel connection from {peer} closed: {why}",
                                  peer=self.conn.peer, why=str(e))
            self.conn.close()
            return
        # A key attempt is admitted (attempts.py) before it costs anything: no TLS
        # handshake, no PAKE for a source over its limits.
        if self.handshake.kind is Kind.CONTROL and not self.tunnel.admit(self.conn):
            self.conn.abort()
            return
        self.conn.send(challenge)
        if credentials is not None:
            self.start_tls(context, server_side=True)
        handshake, decoder, timer = self.handshake, self.decoder, self.handed_on()
        if handshake.kind is Kind.CONTROL:
            self.conn._become(ServerPake(self.conn, self.tunnel, handshake, decoder, timer))
            return
        if credentials is not None:
            self.conn.send(handshake.attest())
        self.conn._become(ServerAuth(self.conn, self.tunnel, handshake, decoder, timer))


class _ServerPhase(_Timed):
    """A server handshake phase after HELLO: it carries the handshake along."""

    def __init__(self, conn: TunnelConnection, tunnel: Any, handshake: ServerHandshake,
                 decoder: FrameDecoder, timer: Any) -> None:
        super().__init__(conn, decoder, timer)
        self.tunnel = tunnel
        self.handshake = handshake


class ServerPake(_ServerPhase):
    """A control connection (its attempt admitted): the client's SPAKE2 message -> ours
    and our confirmation."""

    name = "waiting for PAKE"
    expects = Type.PAKE

    def expected(self, frame: Frame) -> None:
        self.conn.send(self.handshake.on_pake(frame.payload))
        self.conn._become(ServerAuth(self.conn, self.tunnel, self.handshake, self.decoder,
                                     self.handed_on()))


class ServerAuth(_ServerPhase):
    """The client's AUTH: its key confirmation (control) or its MAC (data)."""

    name = "waiting for AUTH"
    expects = Type.AUTH

    def expected(self, frame: Frame) -> None:
        try:
            self.handshake.on_auth(frame.payload)
        except AuthenticationError:
            self.tunnel.auth_failed(self.conn)
            self.conn.abort()
            return
        self.conn._become(Authenticated(self.conn, self.tunnel, self.handshake, self.decoder))
        self.tunnel.authenticated(self.conn, self.handshake)

    def timed_out(self) -> None:
        self._unconfirmed()
        super().timed_out()

    def lost(self, reason: Failure) -> None:
        if not self.conn.closing:
            self._unconfirmed()

    def _unconfirmed(self) -> None:
        # A client that does not accept our key confirmation leaves without its own:
        # it tried a key that is not ours.
        if self.handshake.kind is Kind.CONTROL and self.handshake.confirmed:
            self.tunnel.auth_failed(self.conn)


class Authenticated(Framed):
    """The server knows the client: its tunnel says what the connection becomes."""

    name = "authenticated"

    def __init__(self, conn: TunnelConnection, tunnel: Any, handshake: ServerHandshake,
                 decoder: FrameDecoder) -> None:
        super().__init__(conn, decoder)
        self.tunnel = tunnel
        self.handshake = handshake

    def open_control(self, session: Any, welcome: bytes) -> None:
        self.conn.send(welcome)
        keys = self.handshake.keys
        assert keys is not None
        self.conn._become(Control(self.conn, self.tunnel, session, self.decoder,
                                  Sealer(keys.server_control), Opener(keys.client_control)))

    def refuse_busy(self) -> None:
        self.conn.send(wire.frame(Type.BUSY))
        self.conn.close()

    def pool(self, welcome: bytes) -> None:
        self.conn._write_now(welcome)
        self.conn._become(Pooled(self.conn, self.tunnel, self.decoder,
                                 self.handshake.launches()))


# ---------------------------------------------------------------------------
# The client's handshake


class ClientHello(_Timed):
    """Dialed to the server: HELLO -> CHALLENGE; the mode it offers must be one this
    client accepts (``tls=``, ``ca=``, ``sni=``), on every connection."""

    name = "waiting for CHALLENGE"
    expects = Type.CHALLENGE

    def __init__(self, conn: TunnelConnection, tunnel: Any, kind: Kind,
                 session: tuple[bytes, Any] | None = None) -> None:
        super().__init__(conn)
        self.tunnel = tunnel
        self.kind = kind
        self.handshake = ClientHandshake(tunnel.key, kind, os.urandom(wire.NONCE_SIZE),
                                         session)
        if kind is Kind.DATA:
            conn.ready = Deferred()

    def enter(self) -> None:
        super().enter()
        self.conn.send(self.handshake.hello())

    def timed_out(self) -> None:
        self.tunnel.log.warn("server {peer} did not complete the handshake in {t:g}s",
                             peer=self.conn.peer, t=HANDSHAKE_TIMEOUT)
        super().timed_out()

    def expected(self, frame: Frame) -> None:
        mode = self.handshake.on_challenge(frame.payload)
        refusal = self.tunnel.refuse_mode(self.kind, mode, self.conn.transport)
        if refusal is not None:
            self.tunnel.tls_refused(self.conn, refusal)
            return
        creator = self.tunnel.tls_creator(mode) if mode else None
        if creator is not None:
            self.start_tls(creator.context, False, creator.hostname, creator.describe,
                           creator.session)
        timer = self.handed_on()
        if self.kind is Kind.CONTROL:
            self.conn.send(self.handshake.pake())
            self.conn._become(ClientPake(self, creator, timer))
        elif creator is not None:
            self.conn._become(ClientAttest(self, creator, timer))
        else:
            self.conn.send(self.handshake.auth())
            self.conn._become(ClientWelcome(self, timer))

    def lost(self, reason: Failure) -> None:
        if self.kind is Kind.CONTROL and not self.conn.closing:
            self.tunnel.closed_in_handshake(self.conn)
        self.handshake_lost(reason)

    def handshake_lost(self, reason: Failure) -> None:
        """A data connection's dial fails with the reason (the pool counts it)."""
        if self.conn.ready is not None:
            self.conn.ready.errback(Failure(ConnectionError(
                f"data connection closed during the handshake ({reason.getErrorMessage()})")))


class _ClientTls(_Timed):
    """A client phase inside TLS: a loss here is most likely TLS failing (an
    unverifiable certificate, a wrong name), which the creator explains."""

    def __init__(self, hello: ClientHello, creator: Any, timer: Any) -> None:
        super().__init__(hello.conn, hello.decoder, timer)
        self.hello = hello
        self.creator = creator

    def seen(self) -> bytes:
        """The server certificate's fingerprint as this end saw it (empty with tls=0)."""
        if self.creator is None:
            return b""
        return peer_fingerprint(self.conn.transport) or b""

    def trusted(self) -> None:
        """The server proved itself on this connection: its TLS session (whose ticket
        came before this frame) is the one the next connection resumes."""
        if self.creator is not None:
            self.creator.remember(self.conn.transport)

    def lost(self, reason: Failure) -> None:
        if not self.conn.closing:  # not refused by us: the server or TLS ended it
            if self.creator is not None:
                why = getattr(self.conn.transport, "tls_problem", None)
                self.hello.tunnel.tls_failed(why or reason.getErrorMessage())
            elif self.hello.kind is Kind.CONTROL:
                self.hello.tunnel.closed_in_handshake(self.conn)
        self.hello.handshake_lost(reason)


class ClientPake(_ClientTls):
    """A control connection: the server's SPAKE2 message and confirmation, checked
    against the certificate seen -> our AUTH."""

    name = "waiting for PAKE"
    expects = Type.PAKE

    def expected(self, frame: Frame) -> None:
        conn, hello = self.conn, self.hello
        seen = self.seen()
        try:
            auth = hello.handshake.on_pake(frame.payload, seen)
        except AuthenticationError:
            hello.tunnel.key_refused(conn, fingerprint_text(seen) if seen else "")
            return
        self.trusted()
        conn.send(auth)
        conn._become(ClientWelcome(hello, self.handed_on()))


class ClientAttest(_ClientTls):
    """A data connection under TLS: the server's first frame attests its certificate
    with the session's key."""

    name = "waiting for ATTEST"
    expects = Type.ATTEST

    def expected(self, frame: Frame) -> None:
        conn, tunnel = self.conn, self.hello.tunnel
        seen = self.seen()
        try:
            self.hello.handshake.on_attest(frame.payload, seen)
        except AuthenticationError:
            tunnel.tls_refused(conn, f"its certificate {fingerprint_text(seen)[:23]}... is not "
                                     "attested by the session key (a man in the middle)")
            return
        pinned = tunnel.session_fingerprint
        if self.hello.handshake.tls_mode == 1 and pinned and seen != pinned:
            tunnel.tls_refused(conn, "its certificate changed within the session")
            return
        self.trusted()
        conn.send(self.hello.handshake.auth())
        conn._become(ClientWelcome(self.hello, self.handed_on()))


class ClientWelcome(_Timed):
    name = "waiting for WELCOME"
    expects = Type.WELCOME

    def __init__(self, hello: ClientHello, timer: Any) -> None:
        super().__init__(hello.conn, hello.decoder, timer)
        self.hello = hello

    def frame(self, frame: Frame) -> None:
        if frame.type is Type.BUSY and self.hello.kind is Kind.CONTROL:
            self.conn._become(Busy(self.conn, self.hello.tunnel))
            self.conn.close()
            return
        super().frame(frame)

    def expected(self, frame: Frame) -> None:
        conn, hello = self.conn, self.hello
        try:
            settings = hello.handshake.on_welcome(frame.payload)
        except AuthenticationError:
            hello.tunnel.log.error("server {peer} failed to prove the tunnel key: refusing it",
                                   peer=conn.peer)
            conn.abort()
            return
        if hello.kind is Kind.CONTROL:
            self.leave()
            hello.tunnel.session_up(conn, hello.handshake, settings)
        else:
            conn._become(Pooled(conn, hello.tunnel, self.decoder, hello.handshake.launches()))
            assert conn.ready is not None
            conn.ready.callback(conn)

    def open_control(self, session: Any, welcome: bytes) -> None:
        keys = self.hello.handshake.keys
        assert keys is not None
        self.conn._become(Control(self.conn, self.hello.tunnel, session, self.decoder,
                                  Sealer(keys.client_control), Opener(keys.server_control)))

    def lost(self, reason: Failure) -> None:
        if self.hello.kind is Kind.CONTROL:
            self.hello.tunnel.auth_refused(self.conn)
        self.hello.handshake_lost(reason)


class Busy(State):
    name = "refused as busy"

    def __init__(self, conn: TunnelConnection, tunnel: Any) -> None:
        super().__init__(conn)
        self.tunnel = tunnel

    def data(self, data: bytes) -> None:
        pass

    def lost(self, reason: Failure) -> None:
        self.tunnel.busy(self.conn)


# ---------------------------------------------------------------------------
# After the handshake, at either end


class Control(Framed):
    """The session's signal channel: every frame, its seal checked, goes to its
    ControlSession; what the session sends is sealed."""

    name = "the control channel"

    def __init__(self, conn: TunnelConnection, tunnel: Any, session: Any,
                 decoder: FrameDecoder, sealer: Sealer, opener: Opener) -> None:
        super().__init__(conn, decoder)
        self.tunnel = tunnel
        self.session = session
        self.sealer, self.opener = sealer, opener

    def frame(self, frame: Frame) -> None:
        self.session.frame_received(self.opener.open(frame))

    def send_signal(self, kind: Type, payload: bytes) -> None:
        self.conn.send(self.sealer.seal(kind, payload))

    def lost(self, reason: Failure) -> None:
        self.session.stop()
        self.tunnel.control_lost(self.conn)


class Pooled(Framed):
    """An idle data connection: the next frame may only be LAUNCH, sealed with the
    session's key, and only from the end that launches in this mode (its tunnel says,
    through ``launched``)."""

    name = "pooled"

    def __init__(self, conn: TunnelConnection, tunnel: Any, decoder: FrameDecoder,
                 launches: Launches) -> None:
        super().__init__(conn, decoder)
        self.tunnel = tunnel
        self.launches = launches

    def frame(self, frame: Frame) -> None:
        if frame.type is not Type.LAUNCH:
            super().frame(frame)
        launch = wire.parse_launch(self.launches.open(frame.payload))
        rest = self.decoder.rest()
        if launch.proto is Proto.TCP:
            self.conn.transport.pauseProducing()  # until the target is connected
            self.conn._become(Launched(self.conn, rest))
        else:
            self.conn._become(AwaitingSession(self.conn, rest))
        self.tunnel.launched(self.conn, launch)

    def launch_tcp(self, source: str, dest: str, proxy: int) -> bytes:
        self.conn._become(Launched(self.conn))
        return self.launches.seal(wire.launch_fields(Proto.TCP, source, dest, proxy))

    def launch_udp(self, source: str, dest: str) -> None:
        self.conn.send(self.launches.seal(wire.launch_fields(Proto.UDP, source, dest)))
        self.conn._become(AwaitingSession(self.conn, b""))

    def lost(self, reason: Failure) -> None:
        self.tunnel.pooled_lost(self.conn)


class Launched(State):
    """LAUNCH(TCP) crossed; the relay is not joined yet.  What the other end sends
    meanwhile (and its end of stream) is held for the relay."""

    name = "launched"

    def __init__(self, conn: TunnelConnection, held: bytes = b"") -> None:
        super().__init__(conn)
        self.held = held
        self.ended = False
        self.attempt: Deferred[Any] | None = None

    def data(self, data: bytes) -> None:
        self.held += data

    def eof(self) -> None:
        self.ended = True

    def dialing(self, attempt: Deferred[Any]) -> None:
        self.attempt = attempt

    def take_held(self) -> tuple[bytes, bool]:
        held, self.held = self.held, b""
        return held, self.ended

    def lost(self, reason: Failure) -> None:
        if self.attempt is not None:
            self.attempt.cancel()

    def spliceable(self) -> bool:
        conn = self.conn
        return not conn.tls and not conn.unflushed and splice.plain_tcp(conn.transport)

    def join(self, relay: Any) -> None:
        self.attempt = None
        conn = self.conn
        conn.relay = relay
        conn._become(Streaming(conn, relay))


class Streaming(State):
    """Joined to a relay: the stream's bytes as they are, both ways.  Its end is a TCP
    half-close, or under TLS a close_notify (tls_transport.py)."""

    name = "streaming"

    def __init__(self, conn: TunnelConnection, relay: Any) -> None:
        super().__init__(conn)
        self.relay = relay

    def data(self, data: bytes) -> None:
        self.relay.carry(self.conn, data)

    def eof(self) -> None:
        self.relay.read_closed(self.conn)

    def lost(self, reason: Failure) -> None:
        self.relay.lost(self.conn)

    def send_stream(self, data: bytes) -> None:
        write_through(self.conn.transport, data)

    def end_stream(self) -> None:
        self.conn.transport.loseWriteConnection()


class AwaitingSession(State):
    """LAUNCH(UDP) crossed; the session that will own the datagrams is being made.
    Bytes meanwhile are the first DATAGRAM frames: kept for it."""

    name = "opening a UDP session"

    def __init__(self, conn: TunnelConnection, held: bytes) -> None:
        super().__init__(conn)
        self.held = held

    def data(self, data: bytes) -> None:
        self.held += data

    def carry_udp(self, session: Any) -> None:
        decoder = FrameDecoder(allowed=DATAGRAM_TYPES)
        self.conn._become(Datagrams(self.conn, session, decoder))
        self.conn.transport.registerProducer(session, True)
        self.conn.state.data(self.held)


class Datagrams(Framed):
    """A UDP session's connection: one DATAGRAM frame per datagram, both ways."""

    name = "carrying datagrams"

    def __init__(self, conn: TunnelConnection, session: Any, decoder: FrameDecoder) -> None:
        super().__init__(conn, decoder)
        self.session = session

    def frame(self, frame: Frame) -> None:
        self.session.from_tunnel(frame.payload)

    def lost(self, reason: Failure) -> None:
        self.session.close()


class Closed(State):
    """Closing or gone: whatever still arrives is ignored."""

    name = "closed"

    def data(self, data: bytes) -> None:
        pass

    def eof(self) -> None:
        pass

    def carry_udp(self, session: Any) -> None:
        session.close()

    def join(self, relay: Any) -> None:
        relay.lost(self.conn)  # it went before its relay came: the other side closes


def accepted(tunnel: Any) -> Callable[[TunnelConnection], State]:
    """The first state of a connection the server accepts."""
    return lambda conn: ServerHello(conn, tunnel)


def dialed(tunnel: Any, kind: Kind, session: tuple[bytes, Any] | None = None) -> Callable[
        [TunnelConnection], State]:
    """The first state of a connection the client dials (a data connection's with its
    session: the id and the keys)."""
    return lambda conn: ClientHello(conn, tunnel, kind, session)

