"""End-to-end behaviours every pool transport repeats (``type=`` in the URLs)."""

from __future__ import annotations

from twisted.trial.unittest import TestCase

from tests.integration import (
    WAIT,
    UdpEcho,
    echo_backend,
    exchange,
    peer,
    reverse_server,
    spawn,
    tunnel_pair,
    udp_backend,
)


def no_tracebacks(case: TestCase, *daemons) -> None:
    for daemon in daemons:
        case.assertEqual(daemon.count("Traceback") + daemon.count("Unhandled"), 0,
                         "\n".join(daemon.lines))


async def udp_sessions_cross(case: TestCase, server_query: str, **env: str) -> None:
    """20 datagrams through a tunnel come back, each once and in order."""
    backend = await udp_backend(case, UdpEcho())
    _, _, exposed = await tunnel_pair(case, backend, server_query=server_query, **env)
    p = await peer(case, exposed)
    for n in range(20):
        case.assertEqual(await p.ask(b"datagram %d" % n), [b"datagram %d" % n])


async def wrong_key_refused(case: TestCase, server_query: str, client_query: str = "") -> None:
    """A client with another key: the server says authentication failed, no session."""
    server, tunnel_port, _ = await reverse_server(case, key="right", query=server_query)
    spawn(case, f"client://wrong@127.0.0.1:{tunnel_port}/127.0.0.1:9{client_query}")
    await server.wait_for("authentication failed", timeout=WAIT)
    case.assertEqual(server.count("tunnel session open"), 0)


async def back_after_server_restart(case: TestCase, server_query: str,
                                    client_query: str = "") -> None:
    """The server stops and starts again on its port: the client opens a new session
    by itself and a user's bytes cross it."""
    backend = await echo_backend(case)
    server, client, _ = await tunnel_pair(case, backend, server_query=server_query,
                                          client_query=client_query)
    tunnel_port = await server.listening_port("tunnel")
    await server.stop()
    again = spawn(case, f"server://secret@127.0.0.1:{tunnel_port}/127.0.0.1:0{server_query}")
    await again.wait_for("tunnel session open", timeout=WAIT)
    await client.wait_for("tunnel session open", nth=2, timeout=WAIT)
    exposed = await again.listening_port("target")
    result = await exchange(exposed, iter([b"back again"]))
    case.assertEqual(bytes(result.received), b"back again",
                     "\n".join(again.lines + client.lines))
    no_tracebacks(case, again, client)
