"""A real master on 127.0.0.1 refusing bodies it must not read (#16 item 8): the answer
arrives while the client is still sending, and the master neither grows nor keeps a
temporary file; afterwards it serves as before."""

from __future__ import annotations

import json
import os

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.interfaces import IPullProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.trial.unittest import TestCase
from zope.interface import implementer

from tests.integration import rss_kib
from tests.test_master_api import KEY, Api, start_master

TOTAL = 190_000_000
PIECE = 256 * 1024


@implementer(IPullProducer)
class Uploader(Protocol):
    """Sends a request head, then body bytes as fast as the master takes them, until
    ``total`` or the master answers; remembers how much it had sent by then."""

    def __init__(self, head: bytes, total: int = TOTAL, chunked: bool = False) -> None:
        self.head, self.total, self.chunked = head, total, chunked
        self.sent = 0
        self.sent_when_answered: int | None = None
        self.received = b""
        self.answered: Deferred[bytes] = Deferred()
        self.closed: Deferred[None] = Deferred()
        piece = b"x" * PIECE
        self.piece = b"%x\r\n%s\r\n" % (PIECE, piece) if chunked else piece

    def connectionMade(self) -> None:
        self.transport.write(self.head)
        self.transport.registerProducer(self, False)

    def resumeProducing(self) -> None:
        if self.sent_when_answered is None and self.sent < self.total:
            self.transport.write(self.piece)
            self.sent += PIECE

    def stopProducing(self) -> None:
        pass

    def dataReceived(self, data: bytes) -> None:
        if self.sent_when_answered is None:
            self.sent_when_answered = self.sent
        self.received += data
        top, blank, body = self.received.partition(b"\r\n\r\n")
        length = [int(line.split(b":")[1]) for line in top.split(b"\r\n")
                  if line.lower().startswith(b"content-length:")]
        if blank and length and len(body) >= length[0] and not self.answered.called:
            self.answered.callback(self.received)

    def connectionLost(self, reason: object) -> None:
        if not self.answered.called:
            self.answered.errback(AssertionError(
                f"the master closed the connection without an answer after {self.sent} "
                "bytes of body"))
        self.closed.callback(None)


def deleted_files(pid: int) -> int:
    """Open files of ``pid`` that have no name left: temporary files."""
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            count += os.readlink(f"/proc/{pid}/fd/{fd}").endswith("(deleted)")
        except OSError:
            pass
    return count


class HugeBodies(TestCase):
    timeout = 120

    async def upload(self, master, *headers: str, chunked: bool = False) -> Uploader:
        lines = ["POST /api/v1/instances HTTP/1.1", f"Host: 127.0.0.1:{master.port}",
                 "Content-Type: application/json", *headers]
        uploader = Uploader(("\r\n".join(lines) + "\r\n\r\n").encode(), chunked=chunked)
        await TCP4ClientEndpoint(reactor, "127.0.0.1", master.port).connect(
            Factory.forProtocol(lambda: uploader))
        self.addCleanup(lambda: uploader.transport.abortConnection())
        return uploader

    async def refused(self, master, status: int, code: str, *headers: str,
                      chunked: bool = False) -> None:
        rss, temporary = rss_kib(master.pid), deleted_files(master.pid)
        uploader = await self.upload(master, *headers, chunked=chunked)
        raw = await uploader.answered.addTimeout(30, reactor)
        self.assertLess(uploader.sent_when_answered, uploader.total,
                        "the answer came only after the whole body was sent")
        top, _, body = raw.partition(b"\r\n\r\n")
        self.assertIn(b" %d " % status, top.split(b"\r\n")[0])
        self.assertEqual(json.loads(body)["error"]["code"], code)
        self.assertEqual(deleted_files(master.pid), temporary)  # nothing kept on disk
        grown = (rss_kib(master.pid) - rss) / 1024
        self.assertLess(grown, 16, f"the master grew by {grown:.1f} MiB")
        await uploader.closed.addTimeout(20, reactor)  # closed by the master, not by us
        self.assertLess(uploader.sent, uploader.total)

    async def test_without_the_key_401_while_the_client_is_still_sending(self):
        master = await start_master(self)
        await self.refused(master, 401, "UNAUTHORIZED", f"Content-Length: {TOTAL}")
        self.assertEqual((await Api(master.base).ok("GET", "/instances"))["instances"], [])

    async def test_with_the_key_413_by_content_length(self):
        master = await start_master(self)
        await self.refused(master, 413, "PAYLOAD_TOO_LARGE", f"X-API-Key: {KEY}",
                           f"Content-Length: {TOTAL}")

    async def test_with_the_key_a_chunked_body_is_cut_off(self):
        master = await start_master(self)
        await self.refused(master, 413, "PAYLOAD_TOO_LARGE", f"X-API-Key: {KEY}",
                           "Transfer-Encoding: chunked", chunked=True)
        self.assertEqual((await Api(master.base).ok("GET", "/instances"))["instances"], [])
