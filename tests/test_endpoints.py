"""Listening on port 0 for TCP and UDP at once (nodepass/endpoints.py)."""

import errno
import socket

from twisted.trial.unittest import TestCase

from nodepass import endpoints


class FakeSocket:
    """The kernel as the test tells it: TCP gives these numbers for port 0 in turn; UDP
    refuses the numbers another program holds."""

    tcp_ports: list[int] = []
    udp_taken: set[int] = set()

    def __init__(self, family, kind):
        self.kind = kind
        self.port = 0

    def bind(self, address):
        port = address[1]
        if self.kind == socket.SOCK_STREAM and port == 0:
            port = FakeSocket.tcp_ports.pop(0)
        elif self.kind == socket.SOCK_DGRAM and port in FakeSocket.udp_taken:
            raise OSError(errno.EADDRINUSE, "Address already in use")
        self.port = port

    def getsockname(self):
        return ("127.0.0.1", self.port)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class PortForBoth(TestCase):
    def setUp(self):
        self.patch(endpoints.socket, "socket", FakeSocket)

    def test_a_number_whose_udp_side_is_taken_is_passed_over(self):
        FakeSocket.tcp_ports = [40001, 40002, 40003]
        FakeSocket.udp_taken = {40001, 40002}
        self.assertEqual(endpoints.port_free_for_both("127.0.0.1"), 40003)

    def test_none_found_leaves_the_choice_to_tcp(self):
        FakeSocket.tcp_ports = list(range(41000, 41000 + endpoints.PORT_PROBES))
        FakeSocket.udp_taken = set(FakeSocket.tcp_ports)
        self.assertEqual(endpoints.port_free_for_both("127.0.0.1"), 0)


class RealSockets(TestCase):
    def test_the_number_given_is_free_for_both_on_loopback(self):
        port = endpoints.port_free_for_both("127.0.0.1")
        with socket.socket() as tcp, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            tcp.bind(("127.0.0.1", port))
            udp.bind(("127.0.0.1", port))
