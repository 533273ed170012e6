"""type=2: the tunnel carried in WebSockets, end to end on real processes, directly and
behind real reverse proxies (nginx, haproxy) started by the test."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.trial.unittest import TestCase

from tests.certs import issue, make_ca, write_ca
from tests.integration import (
    WAIT,
    DigestAfterEOF,
    echo_backend,
    exchange,
    listen,
    need,
    pattern_bytes,
    reverse_server,
    spawn,
    tunnel_pair,
)
from tests.test_tunnel_e2e import slow_backend_holds_memory
from tests.transports import back_after_server_restart, no_tracebacks, udp_sessions_cross


async def check_tunnel(case: TestCase, exposed: int, size: int = 64 * 1024 * 1024) -> None:
    """Bytes both ways with a half-close: the backend answers the sha256 of ``size`` bytes
    only after the user's end of stream crossed."""
    data_digest = hashlib.sha256()
    for chunk in pattern_bytes(size, seed=2):
        data_digest.update(chunk)
    result = await exchange(exposed, pattern_bytes(size, seed=2), timeout=60)
    case.assertEqual(bytes(result.received), data_digest.hexdigest().encode())


class Direct(TestCase):
    """A type=2 server; clients that learn the type (data connections as WebSockets),
    and clients that also open their control connection as one (type=2 on their URL)."""

    timeout = 120

    async def test_tcp_with_half_close_and_64_mib_without_and_with_tls(self):
        backend = await listen(self, Factory.forProtocol(DigestAfterEOF))
        for tls, client_query in ((0, ""), (1, ""), (1, "?type=2&tls=1"), (0, "?type=2")):
            server, client, exposed = await tunnel_pair(
                self, backend, server_query=f"?type=2&tls={tls}", client_query=client_query)
            await check_tunnel(self, exposed, 64 * 1024 * 1024 if tls else 8 * 1024 * 1024)
            no_tracebacks(self, server, client)
            await server.stop()
            await client.stop()

    async def test_udp_sessions_cross(self):
        await udp_sessions_cross(self, "?type=2&tls=1", REPORT_INTERVAL="1s")

    async def test_backpressure_into_a_slow_target(self):
        await slow_backend_holds_memory(self, "?type=2&tls=1", 128 * 1024 * 1024)

    async def test_a_wrong_key_is_refused(self):
        server, tunnel_port, _ = await reverse_server(self, key="right", query="?type=2&tls=1")
        client = spawn(self, f"client://wrong@127.0.0.1:{tunnel_port}/127.0.0.1:9?type=2&tls=1")
        await client.wait_for("authentication failed|key", timeout=WAIT)
        await server.wait_for("authentication failed", timeout=WAIT)
        self.assertEqual(server.count("tunnel session open"), 0)

    async def test_the_tunnel_comes_back_after_the_server_restarts(self):
        await back_after_server_restart(self, "?type=2", "?type=2")

    async def test_a_plain_http_client_and_a_keyless_websocket_are_refused(self):
        backend = await echo_backend(self)
        server, _, exposed = await tunnel_pair(self, backend,
                                               server_query="?type=2&path=/np")
        tunnel_port = await server.listening_port("tunnel")
        answers = await _raw(tunnel_port, [
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",  # no upgrade, wrong path
            b"GET /np HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
            b"\x82\x85abcd" + bytes(b ^ m for b, m in zip(b"hello", b"abcda", strict=True)),
            # (a message without the preamble: no key, no tunnel)
            b"\x16\x03\x01\x00\x05hello",  # TLS to a tls=0 server
        ])
        self.assertIn(b"HTTP/1.1 4", answers[0])
        self.assertNotIn(b"Autobahn", answers[0])  # no product banner, no status page
        self.assertNotIn(b"tunnel session", b"".join(answers[1:]))
        await server.wait_for(r"closed: not a nodepass tunnel connection \(bad preamble\)")
        await server.wait_for("TLS from a client to a tls=0 server")
        # the live tunnel is unaffected
        result = await exchange(exposed, iter([b"still here"]))
        self.assertEqual(bytes(result.received), b"still here")
        no_tracebacks(self, server)


class _Raw(Protocol):
    """Sends one request as raw bytes; what comes back until the server closes (or 1 s
    of waiting ends it) is the answer."""

    def __init__(self, request: bytes) -> None:
        self.request = request
        self.answer = b""
        self.done: Deferred[bytes] = Deferred()
        self.timer: Any = None

    def connectionMade(self) -> None:
        self.transport.write(self.request)
        self.timer = reactor.callLater(1.0, self.transport.abortConnection)

    def dataReceived(self, data: bytes) -> None:
        self.answer += data

    def connectionLost(self, reason: Any) -> None:
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.done.callback(self.answer)


async def _raw(port: int, requests: list[bytes]) -> list[bytes]:
    """Each request on its own connection, in turn: the answers."""
    answers = []
    for request in requests:
        raw = _Raw(request)
        await TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=5).connect(
            Factory.forProtocol(lambda raw=raw: raw))
        answers.append(await raw.done.addTimeout(WAIT, reactor))
    return answers


CONTRIB = Path(__file__).resolve().parent.parent / "contrib"

# The contrib files' own addresses, replaced by the test's.
LISTEN, UPSTREAM = "127.0.0.1:8080", "127.0.0.1:10101"
TLS_LISTEN = "127.0.0.1:8443"

NGINX_SKELETON = """
worker_processes 1;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
{server}
}}
"""


class BehindProxies(TestCase):
    """The server behind a real reverse proxy at a path; the client reaches it only
    through the proxy (its control connection a WebSocket too)."""

    timeout = 120

    def folder(self) -> Path:
        path = Path(tempfile.mkdtemp())
        self.addCleanup(shutil.rmtree, path, True)
        return path

    def start(self, argv: list[str], listener: socket.socket, env: dict[str, str]) -> None:
        """Run the proxy on ``listener``, a socket this test bound (port 0) and keeps open:
        no port is picked and hoped free.  The proxy and its workers get a process group of
        their own, ended as a whole: an nginx worker outliving its master would hold the
        test runner's pipes open."""
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL, pass_fds=(listener.fileno(),),
                                   env=env, start_new_session=True)

        def stop() -> None:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(process.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    process.wait(5)
                except subprocess.TimeoutExpired:
                    continue
                try:  # the master is gone; make sure its workers are too
                    os.killpg(process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                break

        self.addCleanup(stop)

    async def through(self, write_config, argv, client_query: str = "?type=2&path=/tunnel",
                      server_query: str = "?type=2&path=/tunnel",
                      carried: bool = True) -> Any:
        """A server with ``server_query`` behind the proxy ``argv`` runs with the config
        ``write_config`` writes, a client with ``client_query`` through it: 16 MiB cross
        (``carried``), or the client is returned before any session (not ``carried``)."""
        backend = await listen(self, Factory.forProtocol(DigestAfterEOF))
        server, tunnel_port, exposed = await reverse_server(
            self, key="secret", query=server_query)
        listener = socket.socket()
        self.addCleanup(listener.close)
        listener.bind(("127.0.0.1", 0))
        listener.listen(128)
        port = listener.getsockname()[1]
        folder = self.folder()
        config = write_config(folder, port, tunnel_port, listener.fileno())
        command, env = argv(folder, config, listener.fileno())
        self.start(command, listener, env)
        for _ in range(20):  # (each try waits at most 1 s for an answer)
            (answer,) = await _raw(port, [b"GET /nothing HTTP/1.0\r\n\r\n"])
            if answer.startswith(b"HTTP/"):
                break
        else:
            self.fail("the proxy never answered on the socket it was handed")
        client = spawn(self, f"client://secret@127.0.0.1:{port}/127.0.0.1:{backend}"
                             f"{client_query}")
        if not carried:
            return client
        await client.wait_for("tunnel session open", timeout=WAIT)
        await check_tunnel(self, exposed, 16 * 1024 * 1024)
        self.assertEqual(server.count("Traceback") + client.count("Traceback"), 0)
        return client

    def nginx(self, contrib: str, listen: str = LISTEN):
        """(write_config, argv) for nginx running the server block ``contrib``; nginx takes
        a listening socket it inherits (NGINX=fd;) for the matching address."""
        nginx = need("nginx", "nginx")

        def write(folder: Path, port: int, upstream: int, fd: int) -> Path:
            for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
                (folder / sub).mkdir()
            block = (CONTRIB / contrib).read_text()
            block = block.replace(listen, f"127.0.0.1:{port}").replace(
                UPSTREAM, f"127.0.0.1:{upstream}")
            if "/etc/nginx/tls/" in block:  # a certificate for proxy.test from self.ca
                crt, key = issue(self.ca, ("proxy.test",)).write(folder, "proxy")
                block = block.replace("/etc/nginx/tls/proxy.crt", crt).replace(
                    "/etc/nginx/tls/proxy.key", key)
            path = folder / "nginx.conf"
            path.write_text(NGINX_SKELETON.format(dir=folder, server=block))
            return path

        return write, lambda folder, config, fd: (
            [nginx, "-p", str(folder), "-c", str(config)], {"NGINX": f"{fd};"})

    async def test_through_nginx(self):
        await self.through(*self.nginx("nginx-websocket.conf"))

    async def test_through_nginx_terminating_tls(self):
        folder = self.folder()
        self.ca = make_ca()
        ca = write_ca(self.ca, folder)
        verified = f"?type=2&path=/tunnel&ca={ca}&sni=proxy.test"
        # without tlsproxy=1 a verified client refuses a tls=0 server behind the proxy
        # (a TLS-inspecting proxy trusted by the system would look the same) ...
        refusing = await self.through(*self.nginx("nginx-websocket-tls.conf", TLS_LISTEN),
                                      client_query=verified, carried=False)
        await refusing.wait_for("refusing server .* it offers tls=0, and this client accepts "
                                "tls=2 or more", timeout=WAIT)
        # ... and with it, takes it
        client = await self.through(*self.nginx("nginx-websocket-tls.conf", TLS_LISTEN),
                                    client_query=verified + "&tlsproxy=1")
        self.assertEqual(client.count("TLS to the proxy, certificate verified for proxy.test; "
                                      "the server behind it tls=0"), 1)

    async def test_behind_a_terminating_proxy_only_a_verified_client_goes(self):
        folder = self.folder()
        self.ca = make_ca()
        # pinning (tls=1) proves nothing about a proxy: the server's tls=0 is refused
        client = await self.through(*self.nginx("nginx-websocket-tls.conf", TLS_LISTEN),
                                    client_query="?type=2&path=/tunnel&tls=1", carried=False)
        await client.wait_for("refusing server .* it offers tls=0, and this client accepts "
                              "tls=1 or more", timeout=WAIT)
        # a server with TLS of its own behind a terminating proxy: it takes no WebSocket
        # in the clear (and the certificate the client verified would not be the one its
        # key attests); the proxy answers 502 and the client says so, once
        ca = write_ca(self.ca, folder)
        client = await self.through(*self.nginx("nginx-websocket-tls.conf", TLS_LISTEN),
                                    client_query=f"?type=2&path=/tunnel&ca={ca}&sni=proxy.test"
                                                 "&tlsproxy=1",
                                    server_query="?type=2&path=/tunnel&tls=1", carried=False)
        await client.wait_for(r"the tunnel's WebSocket at .*/tunnel did not open: WebSocket "
                              r"connection upgrade failed \[502\]: Bad Gateway; retrying",
                              timeout=WAIT)
        self.assertEqual(client.count("tunnel session open"), 0)
        self.assertEqual(client.count("Unhandled|Traceback|dropping connection"), 0,
                         "\n".join(client.lines))

    async def test_through_haproxy_in_http_mode(self):
        haproxy = need("haproxy", "haproxy")

        def write(folder: Path, port: int, upstream: int, fd: int) -> Path:
            text = (CONTRIB / "haproxy-websocket.cfg").read_text()
            text = text.replace(f"bind {LISTEN}", f"bind fd@{fd}").replace(
                UPSTREAM, f"127.0.0.1:{upstream}")
            path = folder / "haproxy.cfg"
            path.write_text(text)
            return path

        await self.through(write, lambda folder, config, fd: (
            [haproxy, "-db", "-f", str(config)], {}))
