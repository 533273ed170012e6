"""Request bodies, in memory through the master's own site: refused before they are read
(#16 item 8) -- without the key, by Content-Length, and a chunked body as it arrives --
and JSON nested too deeply for the parser (#16 item 12), in both dialects."""

from __future__ import annotations

import json

from twisted.internet.address import IPv4Address
from twisted.internet.defer import ensureDeferred
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from nodepass.master.site import GatedChannel
from tests.fakemaster import KEY, MemoryMaster

SERVER = "server://k@127.0.0.1:10101/127.0.0.1:8080"
BIG = 190_000_000


def head(path, *headers):
    lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1:9090",
             "Content-Type: application/json", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def answer(raw):
    """(status, headers as a dict of lowercase names, body) of one HTTP/1.1 answer."""
    top, _, body = raw.partition(b"\r\n\r\n")
    status_line, *lines = top.decode().split("\r\n")
    headers = {k.lower(): v for k, v in (line.split(": ", 1) for line in lines)}
    return int(status_line.split()[1]), headers, body


class Connection:
    """One connection to the master's site, bytes in and out by hand."""

    def __init__(self, master):
        self.master = master
        self.transport = StringTransport(
            hostAddress=IPv4Address("TCP", "127.0.0.1", 9090),
            peerAddress=IPv4Address("TCP", "127.0.0.1", 50000))
        self.channel = master.site.buildProtocol(self.transport.getPeer())
        self.channel.makeConnection(self.transport)

    def send(self, data):
        self.channel.dataReceived(data)

    def answered(self):
        return self.transport.value()


class Refused(SynchronousTestCase):
    def setUp(self):
        self.master = MemoryMaster(self)

    def assertClosedUnread(self, connection):
        """After the answer the connection reads no more, says it is done, and is
        aborted after the grace, the rest of the body never read."""
        self.assertEqual(connection.transport.producerState, "paused")
        before = connection.answered()
        connection.send(b"x" * 1_000_000)  # what was already on its way is dropped
        self.assertEqual(connection.answered(), before)
        self.assertFalse(connection.transport.disconnected)
        self.master.clock.advance(GatedChannel.refusal_grace)
        self.assertTrue(connection.transport.disconnected)
        self.assertEqual((self.master.registry.instances, self.master.children.spawned),
                         ({}, []))

    def test_a_huge_body_without_the_key_is_answered_401_before_it_is_read(self):
        for path, check in (("/api/v1/instances", self.seed_401), ("/api/np/v1/instances",
                                                                   self.np_401)):
            connection = Connection(self.master)
            connection.send(head(path, f"Content-Length: {BIG}"))  # not a byte of body
            status, headers, body = answer(connection.answered())
            self.assertEqual((status, headers["connection"], headers["content-length"]),
                             (401, "close", str(len(body))))
            self.assertEqual(headers["access-control-allow-origin"], "*")
            check(json.loads(body))
            self.assertClosedUnread(connection)

    def seed_401(self, envelope):
        self.assertEqual((envelope["success"], envelope["error"]["code"]),
                         (False, "UNAUTHORIZED"))

    def np_401(self, error):
        self.assertEqual(error["error"], "Unauthorized: API key required")

    def test_a_wrong_key_too(self):
        connection = Connection(self.master)
        connection.send(head("/api/np/v1/instances", "X-API-Key: wrong",
                             "Transfer-Encoding: chunked"))
        status, _, body = answer(connection.answered())
        self.assertEqual((status, json.loads(body)["error"]),
                         (401, "Unauthorized: Invalid API key"))
        self.assertClosedUnread(connection)

    def test_content_length_over_the_limit_is_413_before_the_body(self):
        for path, fragment in (("/api/v1/instances", '"code":"PAYLOAD_TOO_LARGE"'),
                               ("/api/np/v1/instances", '"error":"Invalid request body: '
                                                         f'the body ({BIG} bytes) exceeds '
                                                         '65536 bytes"')):
            connection = Connection(self.master)
            connection.send(head(path, f"X-API-Key: {KEY}", f"Content-Length: {BIG}"))
            status, _, body = answer(connection.answered())
            self.assertEqual(status, 413)
            self.assertIn(fragment, body.decode())
            self.assertClosedUnread(connection)

    def test_a_chunked_body_is_cut_off_once_it_passes_the_limit(self):
        connection = Connection(self.master)
        connection.send(head("/api/v1/instances", f"X-API-Key: {KEY}",
                             "Transfer-Encoding: chunked"))
        chunk = b"4000\r\n" + b" " * 0x4000 + b"\r\n"  # 16 KiB
        sent = 0
        while not connection.answered() and sent < 100:
            connection.send(chunk)
            sent += 1
        self.assertEqual(sent, 5)  # 80 KiB: the first chunk past 64 KiB
        status, _, body = answer(connection.answered())
        self.assertEqual((status, json.loads(body)["error"]["code"]),
                         (413, "PAYLOAD_TOO_LARGE"))
        self.assertClosedUnread(connection)

    def test_a_body_within_the_limit_still_works_chunked_or_not(self):
        body = json.dumps({"url": SERVER}).encode()
        connection = Connection(self.master)
        connection.send(head("/api/v1/instances", f"X-API-Key: {KEY}",
                             "Transfer-Encoding: chunked")
                        + b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body))
        self.master.clock.advance(0)
        status, _, _ = answer(connection.answered())
        self.assertEqual(status, 201)
        code, data, _ = self.successResultOf(ensureDeferred(self.master.call(
            "POST", self.master.np + "/instances", raw=b" " * 60000 + body.replace(
                b"10101", b"10102"))))
        self.assertEqual(code, 201, data)

    def test_the_documentation_needs_no_key_but_still_no_huge_body(self):
        connection = Connection(self.master)
        connection.send(b"GET /api/v1/openapi.json HTTP/1.1\r\nHost: h\r\n\r\n")
        self.assertEqual(answer(connection.answered())[0], 200)
        connection = Connection(self.master)
        connection.send(head("/api/v1/docs", f"Content-Length: {BIG}"))
        self.assertEqual(answer(connection.answered())[0], 413)


class WithoutTheGate(SynchronousTestCase):
    def test_the_routes_still_ask_for_the_key(self):
        """A route never serves a request without the key, even where no gate stands
        before it (the app served by a plain Site): it fails closed."""
        from treq.testing import StubTreq

        master = MemoryMaster(self)
        plain = StubTreq(master.api.app.resource())
        for url, fragment in ((master.seed, b"UNAUTHORIZED"),
                              (master.np, b"Unauthorized: API key required")):
            response = self.successResultOf(plain.get(url + "/instances"))
            self.assertEqual(response.code, 401)
            self.assertIn(fragment, self.successResultOf(plain.content(response)))


class DeepJson(SynchronousTestCase):
    """A body nested deeper than the parser can go is bad JSON, not an internal error."""

    def test_both_dialects_answer_400(self):
        master = MemoryMaster(self)
        for raw in (b"[" * 60_000, b'{"url": ' + b"[" * 30_000 + b"]" * 30_000 + b"}"):
            code, envelope, _ = self.successResultOf(ensureDeferred(master.call(
                "POST", master.seed + "/instances", raw=raw)))
            self.assertEqual((code, envelope["error"]["code"]), (400, "INVALID_JSON"))
            self.assertIn("nested too deeply", envelope["error"]["message"])
            code, error, _ = self.successResultOf(ensureDeferred(master.call(
                "POST", master.np + "/instances", raw=raw)))
            self.assertEqual(code, 400, error)
            self.assertIn("Invalid request body: the body is not valid JSON (nested too "
                          "deeply)", error["error"])
