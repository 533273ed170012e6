"""The end that dials the target.

Each tunnel connection the other end launches reserves a slot and gets, for TCP, a
connection to a target (rotating across several, with failover: see targets.py)
preceded by a PROXY protocol header when asked for; for UDP, a connected UDP
socket to a target.  The server does this in forward mode, the client in reverse
mode.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import CancelledError
from twisted.python.failure import Failure

from nodepass import proxyproto
from nodepass.endpoints import describe_failure
from nodepass.tunnel.channel import QuietFactory, tune
from nodepass.tunnel.flows import Flows, Slot
from nodepass.tunnel.relay import RelayProtocol
from nodepass.tunnel.targets import TargetDialer
from nodepass.tunnel.udp import LocalUdp, UdpSession
from nodepass.tunnel.wire import Launch, Proto
from nodepass.url import Address, format_targets


class LocalConnection(RelayProtocol):
    """A connection to the target, for one launched tunnel connection."""

    def connectionMade(self) -> None:
        tune(self.transport, keepalive=False)


def proxy_header(version: int, source: str, dest: str, target: Any) -> bytes:
    """The PROXY header for a user at ``source`` who reached ``dest`` (the target's
    address stands in when ``dest`` is unknown)."""
    if not version:
        return b""
    reached = proxyproto.split_address(dest) if dest else (target.host, target.port)
    return proxyproto.header(version, proxyproto.split_address(source), reached)


class Egress:
    def __init__(self, flows: Flows, dialer: TargetDialer, proxy: int = 0, notcp: int = 0,
                 noudp: int = 0) -> None:
        self.flows = flows
        self.dialer = dialer
        self.proxy = proxy
        self.notcp, self.noudp = notcp, noudp

    def launched(self, conn: Any, launch: Launch) -> None:
        """The other end launched ``conn`` (a TunnelConnection): serve it."""
        what = f"{launch.proto.name} from {launch.source}"
        if self.notcp if launch.proto is Proto.TCP else self.noudp:
            self.flows.refuse(what, f"no{launch.proto.name.lower()}=1 on this end")
            conn.abort()
        elif launch.proto is Proto.UDP:
            if (slot := self.flows.reserve_udp(what)) is None:
                conn.abort()
            else:
                self._udp(conn, launch, slot)
        elif (slot := self.flows.reserve(what)) is None:
            conn.abort()
        else:
            self.flows.log.debug("launch from {source}", source=launch.source)
            attempt = self.dialer.connect(QuietFactory(LocalConnection))
            conn.dialing(attempt)
            attempt.addCallbacks(lambda local: self._join(conn, local, launch, slot),
                                 lambda reason: self._failed(conn, reason, slot))

    def _join(self, conn: Any, local: LocalConnection, launch: Launch, slot: Slot) -> None:
        header = proxy_header(self.proxy or launch.proxy, launch.source, launch.dest,
                              local.transport.getPeer())
        self.flows.join(local, conn, slot, to_local=header)

    def _failed(self, conn: Any, reason: Failure, slot: Slot) -> None:
        slot.release()
        if not reason.check(CancelledError):
            self.flows.warn(f"cannot reach target {format_targets(self.dialer.targets)}: "
                            f"{describe_failure(reason)}")
        conn.abort()

    def _udp(self, conn: Any, launch: Launch, slot: Slot) -> None:
        """A UDP session: a UDP socket connected to the target carries its datagrams
        (a target host name is resolved first; datagrams wait for it, bounded)."""
        target = self.dialer.udp_target()
        local = LocalUdp()
        session = self.flows.udp_session(conn, local.send, lambda s: local.close(), slot)
        local.received = session.to_tunnel
        conn.carry_udp(session)
        self.flows.log.debug("UDP session for {source}", source=launch.source)
        open_udp_target(self.flows, self.dialer, local, target, session)


def open_udp_target(flows: Flows, dialer: TargetDialer, local: LocalUdp, target: Address,
                    session: UdpSession) -> None:
    """Resolve ``target`` and open ``local`` to it; when it cannot be reached, or refuses
    (ICMP port unreachable), end ``session`` with a throttled line."""

    def opened(ips: list[str]) -> None:
        if session.ended:
            return
        try:
            local.open(flows.clock, ips[0], target.port, dialer.source)
        except (OSError, ValueError) as e:
            failed(Failure(e))

    def failed(reason: Failure) -> None:
        flows.warn(f"cannot reach UDP target {target}: {describe_failure(reason)}")
        session.close()

    def went(why: str) -> None:
        flows.warn(f"UDP target {target} {why}: its session ended")
        session.close()

    local.gone = went

    dialer.names.resolve(target.host).addCallbacks(opened, failed)
