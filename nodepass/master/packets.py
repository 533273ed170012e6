"""A ``SOCK_SEQPACKET`` Unix socket on a reactor: one JSON message per packet, with
descriptors attached by ``SCM_RIGHTS``.

The master talks this way to its fork server and to each host, and a host to the
master.  Messages go out in order; while the peer's socket is full (it reads none
while it imports, at start) they wait here, each with the descriptors it carries.
Each message read is handed on by itself, so one that cannot be handled makes no
other fail.
"""

from __future__ import annotations

import array
import json
import os
import socket
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from nodepass import logs

MAX_MESSAGE = 128 * 1024  # (the kernel takes SEQPACKET messages up to ~208 KiB by default)
MAX_FDS = 3
READS_PER_TURN = 64  # then the reactor turns (a peer that floods us starves nothing)

OnMessage = Callable[[dict[str, Any], list[int]], None]


def receive(sock: socket.socket) -> tuple[bytes, list[int]]:
    """One packet and the descriptors attached to it (b'' at the end)."""
    fds = array.array("i")
    data, ancillary, _, _ = sock.recvmsg(MAX_MESSAGE,
                                         socket.CMSG_SPACE(MAX_FDS * fds.itemsize))
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
    return data, list(fds)


def encode(message: dict[str, Any]) -> bytes:
    data = json.dumps(message, separators=(",", ":")).encode()
    if len(data) > MAX_MESSAGE:
        raise OSError(f"the message is over {MAX_MESSAGE} bytes")
    return data


class PacketChannel:
    """An IReadDescriptor/IWriteDescriptor over a connected SEQPACKET socket."""

    log = logs.logger("nodepass.master")

    def __init__(self, reactor: Any, sock: socket.socket, name: str,
                 on_message: OnMessage, on_closed: Callable[[], None]) -> None:
        sock.setblocking(False)
        self.reactor = reactor
        self.sock: socket.socket | None = sock
        self.name = name
        self.on_message = on_message
        self.on_closed = on_closed
        # (data, descriptors to send and then close, called once sent)
        self.outgoing: deque[tuple[bytes, list[socket.socket], Callable[[], None] | None]]
        self.outgoing = deque()
        self.writing = False
        reactor.addReader(self)

    def send(self, message: dict[str, Any], fds: Sequence[socket.socket] = (),
             sent: Callable[[], None] | None = None) -> None:
        """Queue ``message`` with ``fds`` (closed here once sent); ``sent`` is called
        when it went.  OSError when the message is too long or the channel closed."""
        data = encode(message)
        if self.sock is None:
            raise OSError(f"{self.name} is gone")
        self.outgoing.append((data, list(fds), sent))
        self.flush()

    def flush(self) -> None:
        while self.outgoing and self.sock is not None:
            data, fds, sent = self.outgoing[0]
            try:
                if fds:
                    self.sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                                array.array("i", [f.fileno() for f in fds]))])
                else:
                    self.sock.send(data)
            except BlockingIOError:
                if not self.writing:
                    self.reactor.addWriter(self)
                    self.writing = True
                return
            except OSError:  # the peer is gone; its end of file shows it
                self.close()
                return
            self.outgoing.popleft()
            for f in fds:
                f.close()
            if sent is not None:
                sent()
        if self.writing:
            self.reactor.removeWriter(self)
            self.writing = False

    def unsent(self) -> list[tuple[bytes, list[socket.socket], Callable[[], None] | None]]:
        """What never went (the channel closed first); the descriptors are closed."""
        left = list(self.outgoing)
        self.outgoing.clear()
        for _, fds, _ in left:
            for f in fds:
                f.close()
        return left

    def close(self) -> None:
        """Close our end (once), and what waited to be sent; ``on_closed`` follows."""
        if self.sock is None:
            return
        self.unsent()
        self.reactor.removeReader(self)
        if self.writing:
            self.reactor.removeWriter(self)
            self.writing = False
        self.sock.close()
        self.sock = None
        self.on_closed()

    # IReadDescriptor, IWriteDescriptor
    def fileno(self) -> int:
        return self.sock.fileno() if self.sock is not None else -1

    def logPrefix(self) -> str:
        return self.name

    def connectionLost(self, reason: Any) -> None:
        self.close()

    def doWrite(self) -> None:
        self.flush()

    def doRead(self) -> None:
        self._read(READS_PER_TURN)

    def read_all(self) -> None:
        """Everything the other end sent, to the end of file (it is gone: what it said
        last, before its end is acted on; its socket buffer bounds it)."""
        while self.sock is not None and self._read(READS_PER_TURN):
            pass

    def _read(self, most: int) -> bool:
        """Up to ``most`` messages; whether there may be more."""
        for _ in range(most):
            if self.sock is None:
                return False
            try:
                data, fds = receive(self.sock)
            except BlockingIOError:
                return False
            except OSError:
                data, fds = b"", []
            if not data:
                _close_all(fds)
                self.close()
                return False
            try:
                message = json.loads(data)
                if not isinstance(message, dict):
                    raise ValueError("not an object")
            except (ValueError, RecursionError):
                _close_all(fds)
                self.log.warn("{name}: a malformed message ignored", name=self.name)
                continue
            try:
                self.on_message(message, fds)
            except Exception:
                self.log.failure("{name}: a message not handled", name=self.name)
        return True


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
