"""The API's HTTP/1.1 server: a deadline for each request to arrive whole, and the gate
(gate.py) applied the moment a request's headers are complete.

A request the gate refuses is answered at once, in its dialect, and its body is never
read: not a 190 MB upload without a key, not a chunked body past the limit.
"""

from __future__ import annotations

from io import BytesIO
from typing import Any

from twisted.internet.interfaces import IPushProducer, ISSLTransport, ITCPTransport
from twisted.web.http import HTTPChannel
from twisted.web.server import Request, Site

from nodepass import logs
from nodepass.master.gate import Gate
from nodepass.master.web import Refusal
from nodepass.timers import cancelled

log = logs.logger("nodepass.master")


class DeadlineChannel(HTTPChannel):
    """HTTP/1.1 with a deadline for each request to arrive whole.

    Twisted's idle timeout restarts with every byte, so a client trickling a byte a
    second would hold a connection forever; here a request (headers and body) must
    arrive within REQUEST_DEADLINE seconds of the connection or of the previous
    response, or the connection is closed.  Long responses (the event stream) are
    not limited: the deadline only covers receiving the request.
    """

    request_deadline = 15.0
    _deadline: Any = None

    def connectionMade(self) -> None:
        super().connectionMade()
        self._arm()

    def _arm(self) -> None:
        self._disarm()
        self._deadline = self.callLater(self.request_deadline, self._too_slow)

    def _disarm(self) -> None:
        self._deadline = cancelled(self._deadline)

    def _too_slow(self) -> None:
        self._deadline = None
        log.info("closing an API connection that did not send a whole request in {t:g}s",
                 t=self.request_deadline)
        self.transport.abortConnection()

    def allContentReceived(self) -> None:
        self._disarm()
        super().allContentReceived()

    def requestDone(self, request: Any) -> None:
        super().requestDone(request)
        if self.transport is not None and not self.transport.disconnecting:
            self._arm()

    def connectionLost(self, reason: Any) -> None:
        self._disarm()
        super().connectionLost(reason)


class ApiRequest(Request):
    """A request whose body the channel counts as it arrives (a chunked body has no
    length to be refused by in advance)."""

    def gotLength(self, length: int | None) -> None:
        if getattr(self.channel.site, "gate", None) is None:
            super().gotLength(length)
        else:  # the gate stops a body at 64 KiB: memory holds it, no temporary file
            self.content = BytesIO()

    def handleContentChunk(self, data: bytes) -> None:
        if self.channel.body_chunk(self, len(data)):
            super().handleContentChunk(data)


class GatedChannel(DeadlineChannel):
    """Asks the site's gate about each request when its headers are complete.

    A refusal is written at once with ``Connection: close``; then the channel reads no
    more (the rest of the body stays unread in the kernel, and TCP flow control stops
    the sender), half-closes where TCP allows it, and aborts the connection after
    REFUSAL_GRACE seconds -- closing at once would make the kernel answer the unread
    bytes with a reset that can destroy the answer before the client reads it.
    """

    refusal_grace = 2.0
    _refused = False
    _request_line = b""
    _body_size = 0
    _closing: Any = None

    @property
    def gate(self) -> Gate | None:
        return getattr(getattr(self, "site", None), "gate", None)

    def dataReceived(self, data: bytes) -> None:
        if not self._refused:
            super().dataReceived(data)

    def lineReceived(self, line: bytes) -> None:
        if self._refused:
            return
        waiting = len(self.requests)
        super().lineReceived(line)
        if len(self.requests) > waiting:  # that was a request line: keep it for the gate
            self._request_line = line

    def rawDataReceived(self, data: bytes) -> None:
        if not self._refused:
            super().rawDataReceived(data)

    def allHeadersReceived(self) -> None:
        gate = self.gate
        if gate is not None:
            request = self.requests[-1]
            # What requestReceived would set later, known now (HTTPChannel has checked
            # the request line already).
            method, uri, version = self._request_line.split(b" ")
            request.method, request.uri, request.clientproto = method, uri, version
            request.path = uri.split(b"?", 1)[0]
            self._body_size = 0
            refusal = gate.admit(request, self.length)
            if refusal is not None:
                self._refuse(request, refusal)
                return
        super().allHeadersReceived()

    def body_chunk(self, request: Request, size: int) -> bool:
        """Whether to keep ``size`` more bytes of ``request``'s body."""
        if self._refused:
            return False
        gate = self.gate
        self._body_size += size
        if gate is not None and self._body_size > gate.max_body:
            self._refuse(request, gate.oversized())
            return False
        return True

    def allContentReceived(self) -> None:
        if not self._refused:
            super().allContentReceived()

    def _refuse(self, request: Request, refusal: Refusal) -> None:
        gate = self.gate
        assert gate is not None
        self._refused = True
        self._disarm()
        self.persistent = False
        request.setResponseCode(refusal.status)
        body = gate.dialect_for(request.path).refuse(request, refusal)
        request.setHeader(b"Content-Length", b"%d" % len(body))
        request.setHeader(b"Connection", b"close")
        request.write(body)
        request.finish()  # logged by the site; requestDone closes, as below

    def _arm(self) -> None:
        if not self._refused:
            super()._arm()

    def resumeProducing(self) -> None:
        if not self._refused:  # a refused body is never read again
            super().resumeProducing()

    def loseConnection(self) -> None:
        if not self._refused:
            super().loseConnection()
            return
        transport = self.transport
        producer = IPushProducer(transport, None)
        if producer is not None:
            producer.pauseProducing()
        if ITCPTransport.providedBy(transport) and not ISSLTransport.providedBy(transport):
            transport.loseWriteConnection()  # FIN after the answer; TLS has no half-close
        if self._closing is None:
            self._closing = self.callLater(self.refusal_grace, transport.abortConnection)

    def connectionLost(self, reason: Any) -> None:
        self._closing = cancelled(self._closing)
        super().connectionLost(reason)


class ApiSite(Site):
    """The master's site: the API resource behind ``gate`` (None: no gate, for tests
    of the channel alone)."""

    noisy = False
    protocol = GatedChannel
    requestFactory = ApiRequest

    def __init__(self, resource: Any, gate: Gate | None = None, **kwargs: Any) -> None:
        super().__init__(resource, **kwargs)
        self.gate = gate

    def log(self, request: Any) -> None:
        log.debug("{method} {path} {code}", method=request.method.decode(),
                  path=request.uri.decode("utf-8", "replace"), code=request.code)
