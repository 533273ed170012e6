"""The signal channel after authentication: heartbeat, demand and goodbye.

Both ends send PING every heartbeat interval and answer every PING with a PONG
that echoes it, which measures the round trip.  An end that hears nothing at
all for ``MISSED_BEATS`` intervals declares the session dead and closes it.
Frames go out through ``send(type, payload)``: the connection seals them with the
session's key (handshake.Sealer) and checks the other end's before they come here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.task import LoopingCall

from nodepass.timers import cancelled
from nodepass.tunnel import wire
from nodepass.tunnel.wire import Frame, Goodbye, ProtocolError, Type

MISSED_BEATS = 3


class ControlSession:
    """Heartbeat and control frames for one authenticated control connection."""

    def __init__(
        self,
        clock: Any,
        interval: float,
        send: Callable[[Type, bytes], None],
        on_dead: Callable[[], None],
        on_demand: Callable[[int], None] | None = None,
        on_goodbye: Callable[[int], None] | None = None,
    ) -> None:
        self._clock = clock
        self.interval = interval
        self._send = send
        self._on_dead = on_dead
        self._on_demand = on_demand
        self._on_goodbye = on_goodbye
        self._seq = 0
        self.rtt_ms: float | None = None
        self._loop = LoopingCall(self._beat)
        self._loop.clock = clock
        self._deadline: Any = None

    def start(self) -> None:
        self._loop.start(self.interval, now=True)
        self.heard()

    def stop(self) -> None:
        if self._loop.running:
            self._loop.stop()
        self._deadline = cancelled(self._deadline)

    def heard(self) -> None:
        """Anything from the peer proves it alive."""
        if self._deadline is not None and self._deadline.active():
            self._deadline.reset(self.interval * MISSED_BEATS)
        else:
            self._deadline = self._clock.callLater(self.interval * MISSED_BEATS, self._dead)

    def _micros(self) -> int:
        return int(self._clock.seconds() * 1_000_000)

    def _beat(self) -> None:
        self._seq += 1
        self._send(Type.PING, wire.ping_payload(self._seq, self._micros()))

    def demand(self, waiting: int) -> None:
        """Tell the client that ``waiting`` users wait for a data connection."""
        self._send(Type.DEMAND, wire.demand_payload(waiting))

    def goodbye(self) -> None:
        """This end is shutting down."""
        self._send(Type.GOODBYE, wire.goodbye_payload(Goodbye.SHUTDOWN))

    def _dead(self) -> None:
        self._deadline = None
        self.stop()
        self._on_dead()

    def frame_received(self, frame: Frame) -> None:
        self.heard()
        if frame.type is Type.PING:
            seq, micros = wire.parse_ping(frame.payload)
            self._send(Type.PONG, wire.ping_payload(seq, micros))
        elif frame.type is Type.PONG:
            _, micros = wire.parse_ping(frame.payload)
            rtt = (self._micros() - micros) / 1000.0
            if 0 <= rtt < self.interval * MISSED_BEATS * 1000:
                self.rtt_ms = round(rtt, 3)
        elif frame.type is Type.DEMAND and self._on_demand is not None:
            self._on_demand(wire.parse_demand(frame.payload))
        elif frame.type is Type.GOODBYE and self._on_goodbye is not None:
            self._on_goodbye(frame.payload[0] if frame.payload else 0)
        else:
            raise ProtocolError(f"unexpected {frame.type.name} frame on the control channel")
