"""block=: users refused by their first bytes (SOCKS, HTTP, TLS), in memory and with curl."""

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.utils import getProcessOutputAndValue
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase, TestCase

from nodepass.tunnel.firstbytes import HEAD_LIMIT, FirstBytes, judge
from tests.integration import echo_backend, exchange, need, spawn
from tests.memory import add_data, connect_user, open_session, server_tunnel

SOCKS4 = b"\x04\x01\x00\x50\x7f\x00\x00\x01user\x00"
SOCKS5 = b"\x05\x01\x00"
HTTP = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
CONNECT = b"CONNECT example.com:443 HTTP/1.1\r\n\r\n"
TLS_HELLO = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"
SSH = b"SSH-2.0-OpenSSH_9.2\r\n"


def messages(events):
    return [e.get("text", e.get("log_format", "")) for e in events]


class Judge(SynchronousTestCase):
    def test_table(self):
        table = [
            (SOCKS4, "1", "SOCKS"), (b"\x04\x02", "1", "SOCKS"), (SOCKS5, "1", "SOCKS"),
            (b"\x04\x03", "1", None), (b"\x05\x00", "1", None),
            (HTTP, "2", "HTTP"), (CONNECT, "2", "HTTP"), (b"OPTIONS * HTTP/1.1", "2", "HTTP"),
            (b"get / HTTP/1.1", "2", None), (b" GET /", "2", None),
            (b"GETTINGS /", "2", None),  # no space within the first 8 bytes
            (TLS_HELLO, "3", "TLS"), (b"\x16\x02", "3", None), (b"\x17\x03", "3", None),
            (SSH, "123", None), (HTTP, "13", None), (SOCKS5, "23", None),
            (TLS_HELLO, "123", "TLS"), (HTTP, "123", "HTTP"),
        ]
        for head, block, expected in table:
            self.assertEqual(judge(head, block), expected, (head, block))

    def test_a_short_prefix_waits_for_more(self):
        for head, block in ((b"\x05", "1"), (b"GET", "2"), (b"\x16", "3"), (b"", "1")):
            self.assertIs(judge(head, block), True, head)
        self.assertIsNone(judge(b"GET", "13"))  # SOCKS and TLS are told by the first byte

    @given(st.binary(max_size=40), st.lists(st.integers(1, 12), max_size=8),
           st.sampled_from(["1", "2", "3", "12", "13", "23", "123"]))
    def test_any_chunking_gives_one_verdict_and_loses_nothing(self, data, cuts, block):
        """Fed in any pieces, the verdict is the whole stream's; allowed bytes all pass, in
        order; never more than HEAD_LIMIT bytes are held."""
        screen, passed, refused, start = FirstBytes(block), b"", None, 0
        for cut in [*cuts, len(data)]:
            piece, start = data[start:start + cut], start + cut
            if screen.decided or not piece:
                passed += piece if screen.decided and refused is None else b""
                continue
            refused, out = screen.feed(piece)
            passed += out
            self.assertLessEqual(len(screen.head), HEAD_LIMIT)
            if refused is not None:
                break
        if not screen.decided:
            passed += screen.release()
        whole = judge(data, block)
        if refused is not None:
            self.assertEqual(refused, whole)
        else:
            self.assertIn(whole, (None, True))
            self.assertEqual(passed, data)


class InTheServer(SynchronousTestCase):
    """A reverse-mode server in memory: the user's first bytes decide before they leave."""

    def relayed_user(self, block):
        tunnel, _ = server_tunnel(controls={"block": block})
        control = open_session(tunnel)
        data = add_data(tunnel, control, 46001)
        user, transport = connect_user(tunnel)
        data.frames()  # the LAUNCH
        return tunnel, data, user, transport

    def test_a_socks_greeting_is_refused_counted_and_logged(self):
        tunnel, data, user, transport = self.relayed_user("13")
        with capturedLogs() as events:
            user.dataReceived(SOCKS5[:1])
            self.assertEqual(data.transport.value(), b"")  # held, not yet judged
            user.dataReceived(SOCKS5[1:])
        self.assertEqual(data.transport.value(), b"")  # nothing of it crossed the tunnel
        self.assertTrue(transport.disconnected and data.transport.disconnected)
        self.assertEqual(tunnel.flows.refused, 1)
        self.assertIn("refused connection from 127.0.0.1:50000: its first bytes are SOCKS "
                      "(block=13)", messages(events))

    def test_other_first_bytes_pass_whole_and_the_relay_goes_on(self):
        tunnel, data, user, transport = self.relayed_user("13")
        user.dataReceived(HTTP[:3])
        self.assertEqual(data.transport.value(), HTTP[:3])  # G is neither SOCKS nor TLS
        user.dataReceived(HTTP[3:])
        data.send(b"HTTP/1.1 200 OK\r\n\r\n")
        self.assertEqual((data.transport.value(), transport.value()),
                         (HTTP, b"HTTP/1.1 200 OK\r\n\r\n"))
        self.assertEqual((tunnel.flows.refused, tunnel.flows.traffic.tcp_in), (0, len(HTTP)))

    def test_held_bytes_pass_when_the_user_half_closes(self):
        _tunnel, data, user, _ = self.relayed_user("2")
        user.dataReceived(b"GE")
        self.assertEqual(data.transport.value(), b"")
        user.readConnectionLost()
        self.assertEqual(data.transport.value(), b"GE")
        self.assertTrue(data.transport.write_closed)

    def test_without_block_nothing_is_held(self):
        _, data, user, _ = self.relayed_user("")
        user.dataReceived(b"\x05")
        self.assertEqual(data.transport.value(), b"\x05")

    def test_server_first_protocols_are_not_delayed(self):
        """Nothing waits for the user: the service's greeting reaches them at once."""
        _, data, _user, transport = self.relayed_user("123")
        data.send(b"220 smtp ready\r\n")
        self.assertEqual(transport.value(), b"220 smtp ready\r\n")


class SingleEnd(TestCase):
    """A real single-end client with block=2 in front of a real service, and curl."""

    timeout = 60

    async def test_curl_is_refused_and_other_traffic_passes(self):
        curl = need("curl", "curl")
        backend = await echo_backend(self)
        client = spawn(self, f"client://127.0.0.1:0/127.0.0.1:{backend}?mode=1&block=2"
                             "&log=debug")
        port = await client.listening_port("single-end")
        out, _, code = await getProcessOutputAndValue(
            curl, ["-sS", "--max-time", "10", f"http://127.0.0.1:{port}/"])
        self.assertNotEqual(code, 0)  # the connection closed before any answer
        self.assertEqual(out, b"")
        await client.wait_for(r"refused connection from 127\.0\.0\.1:\d+: its first bytes "
                              r"are HTTP \(block=2\)")
        result = await exchange(port, iter([SSH]), timeout=10)
        self.assertEqual(bytes(result.received), SSH)
