"""TLS modes end to end: real processes, real certificates, a recording proxy and a
TLS-terminating man in the middle."""

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from twisted.internet import reactor, ssl
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.trial.unittest import TestCase

from nodepass import tls
from nodepass.tunnel.handshake import ClientHandshake
from nodepass.tunnel.wire import FrameDecoder, Kind, Type
from tests import certs
from tests.integration import (
    WAIT,
    DigestAfterEOF,
    _OneShot,
    echo_backend,
    eventually,
    exchange,
    listen,
    pattern_bytes,
    recording_proxy,
    reverse_server,
    rss_kib,
    sleep,
    spawn,
    tunnel_pair,
)
from tests.procs import REPO, clean_env, run_nodepass

SECRET = b"this payload must never cross the tunnel in clear " * 64


def folder(case):
    path = Path(tempfile.mkdtemp())
    case.addCleanup(shutil.rmtree, path, True)
    return path


class SelfSigned(TestCase):
    timeout = 60

    async def test_traffic_flows_with_half_close(self):
        backend = await listen(self, Factory.forProtocol(DigestAfterEOF))
        server, client, exposed = await tunnel_pair(self, backend, server_query="?tls=1")
        data = b"".join(pattern_bytes(4 * 1024 * 1024, seed=5))
        result = await exchange(exposed, iter([data]))
        self.assertEqual(bytes(result.received), hashlib.sha256(data).hexdigest().encode())
        line = await client.wait_for("tunnel session open")
        fingerprint = (await server.wait_for("tls=1: certificate fingerprint")).rsplit(" ", 1)[1]
        self.assertIn(f"tls=1, certificate {fingerprint}", line)

    def test_tunnel_processes_run_tls_without_pyopenssl(self):
        """Their TLS is the standard library's: a fresh server or client process never
        loads pyOpenSSL, though Twisted's TCP and endpoint modules would (4 MiB); a
        master, whose HTTPS listener is Twisted's, still does."""
        probe = ("import sys; from nodepass import tap; o = tap.Options({}); "
                 "o.parseOptions([sys.argv[1]]); import twisted.internet.endpoints, "
                 "twisted.internet.tcp; print('OpenSSL.SSL' in sys.modules)")
        loaded = {}
        for url in ("server://k@127.0.0.1:0/127.0.0.1:1?tls=1",
                    "client://k@127.0.0.1:1/127.0.0.1:2?tls=1",
                    f"master://127.0.0.1:0?state={folder(self)}"):
            done = subprocess.run([sys.executable, "-c", probe, url], capture_output=True,
                                  text=True, timeout=WAIT, env=clean_env(), cwd=REPO)
            self.assertEqual(done.returncode, 0, done.stderr)
            loaded[url.split(":", 1)[0]] = done.stdout.strip()
        self.assertEqual(loaded, {"server": "False", "client": "False", "master": "True"})

    async def test_an_idle_tls_connection_costs_little_at_each_end(self):
        """Fresh pairs keeping 16 and 216 pooled TLS connections: the difference per
        connection stays far under what pyOpenSSL cost (55-115 KiB per end); 16-23 KiB
        measured (bench/idle_memory.py), 48 allowed here for the noise of a test run."""
        pairs = {}
        for pool in (16, 216):
            server, client, _ = await tunnel_pair(self, 9, server_query=f"?tls=1&max={pool}",
                                                  client_query=f"?min={pool}")
            pairs[pool] = (server, client)
        for pool, ends in pairs.items():
            for end in ends:
                await eventually(lambda e=end, n=pool: _sockets(e.pid) > n)
        await sleep(1.0)  # the last handshakes end
        for side in (0, 1):
            per_connection = (rss_kib(pairs[216][side].pid) - rss_kib(pairs[16][side].pid)) / 200
            self.assertLess(per_connection, 48, ("server", "client")[side])

    async def test_finished_connections_are_released_on_both_ends(self):
        # Regression: an EOF frame that arrived with LAUNCH left the client's TLS connection
        # unread, so it never saw the server's close and the relay was never released.
        backend = await echo_backend(self)
        server, client, exposed = await tunnel_pair(
            self, backend, server_query="?tls=1&log=debug", client_query="?log=debug",
            REPORT_INTERVAL="200ms")
        for n in range(40):
            result = await exchange(exposed, iter([b"%d" % n]))
            self.assertEqual(bytes(result.received), b"%d" % n)
        await sleep(0.6)
        for end in (server, client):
            seen = len(end.lines)
            line = await end.wait_for("report: connected", nth=end.count("report: connected") + 1)
            self.assertIn(" connections=0 ", line, end.lines[seen:])

    async def tunnel_bytes_seen(self, query):
        backend = await echo_backend(self)
        _server, tunnel_port, exposed = await reverse_server(self, query=query)
        proxy, record = await recording_proxy(self, tunnel_port)
        client = spawn(self, f"client://k@127.0.0.1:{proxy}/127.0.0.1:{backend}")
        await client.wait_for("tunnel session open")
        result = await exchange(exposed, iter([SECRET]))
        self.assertEqual(bytes(result.received), SECRET)
        return bytes(record)

    async def test_payload_is_not_visible_on_the_tunnel(self):
        seen = await self.tunnel_bytes_seen("?tls=1")
        self.assertGreater(len(seen), len(SECRET) * 2)  # the echo went both ways through it
        self.assertNotIn(SECRET[:64], seen)

    async def test_the_recorder_would_see_plain_tls0_traffic(self):
        seen = await self.tunnel_bytes_seen("?tls=0")
        self.assertIn(SECRET, seen)

    async def test_a_wrong_key_is_logged_by_the_server_too(self):
        for mode in ("1", "0"):
            server, tunnel_port, _ = await reverse_server(self, key="right-key",
                                                          query=f"?tls={mode}")
            client = spawn(self, f"client://wrong-key@127.0.0.1:{tunnel_port}/127.0.0.1:1")
            await client.wait_for(rf"ERROR .*refusing server 127.0.0.1:{tunnel_port}: it does "
                                  "not prove the tunnel key")
            await server.wait_for(r"WARN .*authentication failed from 127\.0\.0\.1:\d+: a "
                                  "wrong key, or not a nodepass client")
            await client.stop()

    async def test_man_in_the_middle_is_refused(self):
        server, tunnel_port, _exposed = await reverse_server(self, query="?tls=1")
        mitm = await listen(self, _MitmFactory(tunnel_port))
        client = spawn(self, f"client://k@127.0.0.1:{mitm}/127.0.0.1:1")
        await client.wait_for(r"ERROR .*refusing server 127.0.0.1:\d+: it does not prove the "
                              r"tunnel key for the certificate it showed \(.*\.\.\.\): a man "
                              "in the middle, or a different key")
        self.assertEqual(server.count("tunnel session open"), 0)
        self.assertEqual(client.count("tunnel session open"), 0)


class _MitmClientSide(Protocol):
    """Terminates the client's TLS with its own self-signed certificate and opens its
    own TLS to the real server, relaying the plaintext handshake in between."""

    def __init__(self, upstream_port):
        self.upstream_port = upstream_port
        self.upstream = None
        self.pending = []

    def connectionMade(self):
        self.upstream = _MitmServerSide(self)
        TCP4ClientEndpoint(reactor, "127.0.0.1", self.upstream_port).connect(
            _OneShot(self.upstream)).addCallback(self._connected)

    def _connected(self, _):
        for data in self.pending:
            self.upstream.transport.write(data)

    def dataReceived(self, data):
        if self.upstream.transport is None:
            self.pending.append(data)
        else:
            self.upstream.transport.write(data)

    def connectionLost(self, reason):
        if self.upstream.transport is not None:
            self.upstream.transport.loseConnection()


class _MitmServerSide(Protocol):
    CHALLENGE_SIZE = 3 + 33

    def __init__(self, client_side):
        self.client_side = client_side
        self.buffer = b""
        self.tls = False

    def dataReceived(self, data):
        if self.tls:
            self.client_side.transport.write(data)
            return
        self.buffer += data
        if len(self.buffer) >= self.CHALLENGE_SIZE:
            challenge, rest = self.buffer[: self.CHALLENGE_SIZE], self.buffer[self.CHALLENGE_SIZE:]
            self.client_side.transport.write(challenge)
            own = tls.make_self_signed(certs.NOW, "mitm").server_options()
            self.client_side.transport.startTLS(own)
            self.transport.startTLS(ssl.CertificateOptions(verify=False))
            self.tls = True
            if rest:
                self.client_side.transport.write(rest)

    def connectionLost(self, reason):
        self.client_side.transport.loseConnection()


class _MitmFactory(Factory):
    def __init__(self, upstream_port):
        self.upstream_port = upstream_port

    def buildProtocol(self, addr):
        return _MitmClientSide(self.upstream_port)


class Verified(TestCase):
    """tls=2: a CA, certificates for the right name, the wrong name, expired ones."""

    timeout = 90

    def setUp(self):
        self.dir = folder(self)
        self.ca = certs.make_ca()
        self.ca_file = certs.write_ca(self.ca, self.dir)

    def server_query(self, issued, name="server"):
        crt, key = issued.write(self.dir, name)
        return f"?tls=2&crt={crt}&key={key}", crt, key

    async def test_a_server_offering_less_than_verified_tls_is_refused(self):
        # a client with ca= expects verified TLS: a server (or an impostor in its place)
        # offering tls=1 or tls=0 is refused before the key is used at all
        for offered in ("?tls=1", ""):
            server, tunnel_port, _ = await reverse_server(self, query=offered)
            client = spawn(self, f"client://k@127.0.0.1:{tunnel_port}/127.0.0.1:1"
                                 f"?ca={self.ca_file}")
            await client.wait_for(
                rf"ERROR .*refusing server 127.0.0.1:{tunnel_port}: it offers tls="
                rf"{offered[-1:] or 0}, and this client accepts tls=2 or more \(its URL asks "
                r"for a verified certificate \(ca= or sni=\)\)")
            self.assertEqual(server.count("tunnel session open"), 0)
            self.assertEqual(server.count("authentication failed"), 0)  # no PAKE was tried

    async def refused(self, issued, reason, client_query=None):
        query, _, _ = self.server_query(issued)
        server, tunnel_port, _exposed = await reverse_server(self, query=query)
        if client_query is None:
            client_query = f"?ca={self.ca_file}"
        client = spawn(self, f"client://k@127.0.0.1:{tunnel_port}/127.0.0.1:1{client_query}")
        await client.wait_for(rf"ERROR .*TLS with server 127.0.0.1:{tunnel_port} failed: "
                              f".*{reason}")
        self.assertEqual(server.count("tunnel session open"), 0)

    async def test_a_pinning_websocket_client_pins_a_tls_2_server_on_every_connection(self):
        # type=2&tls=1: the control WebSocket's TLS pins (the handshake binds what it
        # saw); its data WebSockets pin the same way, whatever name the certificate has,
        # and the session line does not claim a verification that did not happen
        query, _, _ = self.server_query(certs.issue(self.ca, ("elsewhere.example",)))
        backend = await echo_backend(self)
        _, client, exposed = await tunnel_pair(self, backend, server_query=query + "&type=2",
                                               client_query="?type=2&tls=1")
        result = await exchange(exposed, iter([b"pinned"]))
        self.assertEqual(bytes(result.received), b"pinned")
        self.assertEqual(client.count("pinned by the handshake; this client's TLS did not "
                                      r"verify it \(its URL says tls=1\)"), 1)

    async def test_good_certificate_with_private_ca(self):
        query, _, _ = self.server_query(certs.issue(self.ca))
        backend = await echo_backend(self)
        _, client, exposed = await tunnel_pair(self, backend, server_query=query,
                                               client_query=f"?ca={self.ca_file}")
        result = await exchange(exposed, iter([b"verified"]))
        self.assertEqual(bytes(result.received), b"verified")
        await client.wait_for(r"tunnel session open \(tls=2")

    async def test_sni_names_the_certificate_when_dialing_by_ip(self):
        query, _, _ = self.server_query(certs.issue(self.ca, ("tunnel.example",)))
        backend = await echo_backend(self)
        _, _, exposed = await tunnel_pair(
            self, backend, server_query=query,
            client_query=f"?ca={self.ca_file}&sni=tunnel.example")
        result = await exchange(exposed, iter([b"by name"]))
        self.assertEqual(bytes(result.received), b"by name")

    async def test_wrong_name_is_refused(self):
        await self.refused(certs.issue(self.ca, ("other.example",)), "mismatch")

    async def test_expired_is_refused(self):
        await self.refused(certs.issue(self.ca, expired=True), "the certificate has expired")

    async def test_untrusted_ca_is_refused(self):
        await self.refused(certs.issue(certs.make_ca("stranger CA")), "not trusted",
                           client_query="")

    async def test_reload_picks_up_a_renewed_certificate_without_dropping_a_relay(self):
        first = certs.issue(self.ca)
        query, crt, _ = self.server_query(first)
        backend = await listen(self, Factory.forProtocol(DigestAfterEOF))
        server, _, exposed = await tunnel_pair(self, backend, server_query=query,
                                               client_query=f"?ca={self.ca_file}")
        self.assertEqual(await _served_fingerprint(_port_of(server, "tunnel")),
                         tls.fingerprint(first.cert))
        chunks = [os.urandom(64 * 1024) for _ in range(20)]
        sender = _Paced(chunks)
        await TCP4ClientEndpoint(reactor, "127.0.0.1", exposed).connect(_OneShot(sender))

        renewed = certs.issue(self.ca)
        renewed.write(self.dir, "server")
        server.send_signal(signal.SIGHUP)
        await server.wait_for("certificate reloaded from")
        self.assertEqual(await _served_fingerprint(_port_of(server, "tunnel")),
                         tls.fingerprint(renewed.cert))

        Path(crt).write_text("not a certificate")
        server.send_signal(signal.SIGHUP)
        await server.wait_for("certificate reload failed, keeping the current one: crt file")
        self.assertEqual(await _served_fingerprint(_port_of(server, "tunnel")),
                         tls.fingerprint(renewed.cert))

        reply = await sender.done.addTimeout(30, reactor)
        self.assertEqual(reply, hashlib.sha256(b"".join(chunks)).hexdigest().encode())


class _Paced(Protocol):
    def __init__(self, chunks):
        self.chunks = list(chunks)
        self.reply = b""
        self.done = Deferred()

    def connectionMade(self):
        self._next()

    def _next(self):
        if not self.chunks:
            self.transport.loseWriteConnection()
            return
        self.transport.write(self.chunks.pop(0))
        reactor.callLater(0.1, self._next)

    def dataReceived(self, data):
        self.reply += data

    def connectionLost(self, reason):
        self.done.callback(self.reply)


def _port_of(daemon, role):
    for line in daemon.lines:
        if f"{role} listening on" in line:
            return int(line.rsplit(":", 1)[1])
    raise AssertionError(f"no {role} port")


class _Peek(Protocol):
    """Speaks the tunnel handshake (with the key: so it counts as no failed attempt) far
    enough to learn the certificate served, then lets the server say BUSY."""

    def __init__(self, key=b"secret"):
        self.decoder = FrameDecoder()
        self.handshake = ClientHandshake(key, Kind.CONTROL, os.urandom(32))
        self.done = Deferred()

    def connectionMade(self):
        self.transport.write(self.handshake.hello())

    def dataReceived(self, data):
        if self.done.called:
            return
        self.decoder.feed(data)
        frame = self.decoder.next_frame()
        if frame is not None and frame.type is Type.CHALLENGE:
            self.handshake.on_challenge(frame.payload)
            self.transport.startTLS(ssl.CertificateOptions(verify=False))
            self.transport.write(self.handshake.pake())
        elif frame is not None and frame.type is Type.PAKE:
            seen = tls.fingerprint(self.transport.getPeerCertificate().to_cryptography())
            self.transport.write(self.handshake.on_pake(frame.payload, seen))
            self.done.callback(seen)


def _sockets(pid):
    fds = Path(f"/proc/{pid}/fd")
    return sum(1 for fd in fds.iterdir() if os.readlink(fd).startswith("socket:"))


async def _served_fingerprint(port):
    peek = _Peek()
    await TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(_OneShot(peek))
    return await peek.done.addTimeout(10, reactor)


class StartupRefusals(TestCase):
    """Bad files stop the start with exit 2 and one line; never a fall back."""

    def test_each_bad_file(self):
        here = folder(self)
        ca = certs.make_ca()
        good_crt, good_key = certs.issue(ca).write(here, "good")
        _, other_key = certs.issue(ca).write(here, "other")
        garbage = here / "garbage.pem"
        garbage.write_text("hello\n")
        encrypted = here / "encrypted.key"
        from cryptography.hazmat.primitives import serialization
        encrypted.write_bytes(certs.issue(ca).key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"pw")))
        cases = [
            (f"crt={here}/missing.crt&key={good_key}", "crt file", "does not exist"),
            (f"crt={garbage}&key={good_key}", f"crt file '{garbage}'", "holds no PEM certificate"),
            (f"crt={good_crt}&key={garbage}", f"key file '{garbage}'", "holds no PEM private key"),
            (f"crt={good_crt}&key={encrypted}", f"key file '{encrypted}'", "is encrypted"),
            (f"crt={good_crt}&key={other_key}", f"key file '{other_key}'",
             f"does not match the certificate in '{good_crt}'"),
        ]
        for query, part, reason in cases:
            result = run_nodepass(f"server://k@127.0.0.1:0/127.0.0.1:1?tls=2&{query}")
            self.assertEqual(result.returncode, 2, (query, result.stderr))
            self.assertEqual(result.stderr.count("\n"), 1, result.stderr)
            self.assertIn(part, result.stderr)
            self.assertIn(reason, result.stderr)
        result = run_nodepass(f"client://k@127.0.0.1:1/127.0.0.1:2?ca={garbage}")
        self.assertEqual(result.returncode, 2)
        self.assertIn(f"ca file '{garbage}' holds no PEM certificate", result.stderr)

