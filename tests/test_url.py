"""The URL grammar: every accepted form, every refusal, and the round trip."""

import os
import tempfile

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from nodepass.url import (
    Address,
    ClientConfig,
    MasterConfig,
    ServerConfig,
    URLError,
    derived_key,
    format_url,
    parse,
)


def _pem_files(case):
    folder = tempfile.mkdtemp()
    case.addCleanup(lambda: [os.remove(os.path.join(folder, n)) for n in os.listdir(folder)])
    paths = []
    for name in ("cert.pem", "key.pem"):
        path = os.path.join(folder, name)
        with open(path, "w") as f:
            f.write("-----BEGIN X-----\n")
        paths.append(path)
    return paths


class AcceptedForms(SynchronousTestCase):
    def test_table(self):
        table = [
            ("server://0.0.0.0:10101/0.0.0.0:8080",
             ServerConfig(tunnel=Address("0.0.0.0", 10101), target=Address("0.0.0.0", 8080))),
            ("server://secret@127.0.0.1:10101/127.0.0.1:8080?log=debug&tls=1",
             ServerConfig(tunnel=Address("127.0.0.1", 10101), target=Address("127.0.0.1", 8080),
                          tunnel_key="secret", log="debug", tls=1)),
            ("client://server.example.com:10101/127.0.0.1:8080",
             ClientConfig(tunnel=Address("server.example.com", 10101),
                          target=Address("127.0.0.1", 8080))),
            ("client://k@[::1]:10101/[2001:db8::1]:53?log=none",
             ClientConfig(tunnel=Address("::1", 10101), target=Address("2001:db8::1", 53),
                          tunnel_key="k", log="none")),
            ("CLIENT://Host.Example.COM:1/localhost:65535",
             ClientConfig(tunnel=Address("host.example.com", 1),
                          target=Address("localhost", 65535))),
            ("master://127.0.0.1:9090",
             MasterConfig(api=Address("127.0.0.1", 9090), prefix="/api")),
            ("master://127.0.0.1:9090/",
             MasterConfig(api=Address("127.0.0.1", 9090), prefix="/api")),
            ("master://[::]:9090/admin/np/?log=warn&tls=1",
             MasterConfig(api=Address("::", 9090), prefix="/admin/np", log="warn", tls=1)),
            ("server://p%40ss%2Fw%3Ard@h:1/h:2",
             ServerConfig(tunnel=Address("h", 1), target=Address("h", 2),
                          tunnel_key="p@ss/w:rd")),
            ("server://h:1/h:2?log=fatal&tls=0",
             ServerConfig(tunnel=Address("h", 1), target=Address("h", 2), log="fatal")),
        ]
        for text, expected in table:
            self.assertEqual(parse(text), expected, text)

    def test_tls2_with_readable_files(self):
        crt, key = _pem_files(self)
        config = parse(f"server://h:1/h:2?tls=2&crt={crt}&key={key}")
        self.assertEqual((config.tls, config.crt, config.key), (2, crt, key))

    def test_canonical_form_fills_every_parameter(self):
        self.assertEqual(format_url(parse("server://0.0.0.0:10101/0.0.0.0:8080?tls=1")),
                         "server://0.0.0.0:10101/0.0.0.0:8080?log=info&tls=1")
        self.assertEqual(format_url(parse("client://k@[::1]:1/h:2")),
                         "client://k@[::1]:1/h:2?log=info")
        self.assertEqual(format_url(parse("master://127.0.0.1:9090")),
                         "master://127.0.0.1:9090/api?log=info&tls=0&auth=1&persist=1")

    def test_controls(self):
        config = parse("client://k@h:1/127.0.0.1:2,[::1]:3?mode=1&rate=100&slot=0&read=1m30s"
                       "&proxy=2&noudp=1")
        self.assertEqual(config.targets, (Address("127.0.0.1", 2), Address("::1", 3)))
        self.assertEqual((config.mode, config.rate, config.slot, config.read, config.proxy,
                          config.dial, config.notcp, config.noudp),
                         (1, 100, 0, 90.0, 2, "auto", 0, 1))
        self.assertEqual(parse("client://h:1/name.example:2,127.0.0.1:3?dial=127.0.0.2").dial,
                         "127.0.0.2")
        self.assertEqual(parse("server://h:1/h:2?dial=[::1]").dial, "::1")

    def test_canonical_form_shows_controls_only_when_not_default(self):
        self.assertEqual(
            format_url(parse("server://h:1/h:2,h:3?noudp=1&slot=65536&read=90s&mode=0&rate=8")),
            "server://h:1/h:2,h:3?log=info&tls=0&read=90s&rate=8&noudp=1")
        self.assertEqual(format_url(parse("client://h:1/h:2?read=500ms&dial=::1&proxy=1&mode=2")),
                         "client://h:1/h:2?log=info&mode=2&read=500ms&proxy=1&dial=::1")

    def test_nodepass_1_parameters(self):
        """min, max, dns, block and type, as NodePass 1.14 panels write them."""
        server = parse("server://h:1/h:2?max=512&dns=5m0s&block=31&type=0&proxy=0")
        self.assertEqual((server.max, server.dns, server.block, server.type), (512, 300.0, "13", 0))
        client = parse("client://h:1/h:2?min=64&max=1024&dns=0&block=0")
        self.assertEqual((client.min, client.max, client.dns, client.block), (64, 1024, 0.0, ""))
        defaults = parse("client://h:1/h:2")
        self.assertEqual((defaults.min, defaults.max, defaults.dns, defaults.block,
                          defaults.type), (None, None, 300.0, "", 0))
        self.assertEqual(format_url(server), "server://h:1/h:2?log=info&tls=0&block=13&max=512")
        self.assertEqual(format_url(client), "client://h:1/h:2?log=info&dns=0&min=64&max=1024")
        master = parse("master://127.0.0.1:9090/admin?np=/panel/")
        self.assertEqual((master.np_prefix, parse("master://h:1/admin").np_prefix),
                         ("/panel", "/admin/np"))
        self.assertEqual(format_url(master), "master://127.0.0.1:9090/admin?log=info&tls=0"
                                             "&auth=1&persist=1&np=/panel")

    def test_port_0_where_this_end_listens(self):
        """Any free port: for tests and for whoever reads the port from the log."""
        self.assertEqual(parse("server://127.0.0.1:0/127.0.0.1:0").tunnel.port, 0)
        self.assertEqual(parse("master://127.0.0.1:0").api.port, 0)
        self.assertEqual(parse("client://127.0.0.1:0/127.0.0.1:9").tunnel.port, 0)  # single-end
        self.assertEqual(parse("client://h:1/127.0.0.1:0?mode=2").target.port, 0)  # forward

    def test_default_key_is_port_in_hex(self):
        self.assertEqual(derived_key(parse("server://h:10101/h:2")), "2775")
        self.assertEqual(derived_key(parse("server://abc@h:10101/h:2")), "abc")


def _parse_as_nobody(url, readable):
    """Root reads every file: fork, drop to nobody, and report what parse says."""
    for path in readable:
        os.chmod(path, 0o755)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never returns into trial
        try:
            os.setegid(65534)
            os.seteuid(65534)
            try:
                parse(url)
                os.write(write_end, b"accepted")
            except URLError as e:
                os.write(write_end, str(e).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as f:
        message = f.read().decode()
    os.waitpid(pid, 0)
    return message


class Refusals(SynchronousTestCase):
    """Each mistake is refused with one line naming the part and what is allowed."""

    table = [
        ("", "no scheme"),
        ("0.0.0.0:10101/0.0.0.0:8080", "no scheme"),
        ("tunnel://h:1/h:2", "scheme: unknown 'tunnel' (allowed: server, client, master)"),
        ("http://h:1/h:2", "unknown 'http'"),
        ("server://h/h:2", "tunnel address: missing port in 'h'"),
        ("server://h:/h:2", "tunnel address: missing port (allowed: 0-65535, 0 for any free "
         "port)"),
        ("client://h:0/h:2?mode=2", "server address: port 0 means any free port, which only an "
         "address this end listens on may use (allowed here: 1-65535)"),
        ("server://h:1/h:0?mode=2", "target address: port 0 means any free port"),
        ("client://h:1/h:0?mode=1", "target address: port 0 means any free port"),
        ("server://h:1/h:0,h:2", "target address #1: port 0 is out of range (allowed: "
         "1-65535)"),
        ("server://h:65536/h:2", "tunnel address: port 65536 is out of range"),
        ("server://h:http/h:2", "tunnel address: port 'http' is not a number"),
        ("server://:1/h:2", "tunnel address: missing host"),
        ("server://h:1", "target address: missing"),
        ("server://h:1/", "target address: missing"),
        ("server://h:1/h", "target address: missing port in 'h'"),
        ("server://h:1/h:99999", "target address: port 99999 is out of range"),
        ("client://h:1/h:2:3", "target address: IPv6 host 'h:2' must be in brackets"),
        ("client://::1:1/h:2", "must be in brackets"),
        ("client://[::1/h:2", "server address: unclosed '['"),
        ("client://[::g]:1/h:2", "server address: '::g' is not an IPv6 address"),
        ("client://[::1]/h:2", "server address: missing port after [::1]"),
        ("client://999.1.1.1:1/h:2", "server address: '999.1.1.1' is not an IPv4 address"),
        ("client://bad_host:1/h:2", "server address: 'bad_host' is not a valid host"),
        ("client://-h:1/h:2", "is not a valid host"),
        ("server://@h:1/h:2", "key: empty key before '@'"),
        ("server://h:1/h:2?tsl=1",
         "query: unknown parameter 'tsl' for server:// (allowed: log, tls, crt, key, mode, "
         "read, rate, slot, proxy, dial, notcp, noudp, dns, block, max, type, path)"),
        ("server://h:1/h:2?min=8", "unknown parameter 'min' for server:// (min is the client's "
         "pool floor; a server bounds the pool with max)"),
        ("client://h:1/h:2?min=0", "bad value '0' for 'min' (allowed: 1-65536 pooled"),
        ("server://h:1/h:2?max=65537", "bad value '65537' for 'max' (allowed: 1-65536"),
        ("client://h:1/h:2?min=9&max=8", "query: min=9 is greater than max=8 (allowed: "
         "min <= max)"),
        ("client://h:1/h:2?dns=5", "bad value '5' for 'dns' (allowed: a duration like 30s"),
        ("server://h:1/h:2?block=4", "bad value '4' for 'block' (allowed: 0, or digits of 1 "
         "(SOCKS), 2 (HTTP), 3 (TLS), like 13)"),
        ("server://h:1/h:2?block=11", "bad value '11' for 'block'"),
        ("server://h:1/h:2?block=10", "bad value '10' for 'block'"),
        ("client://h:1/h:2?tlsproxy=1&sni=x", "query: tlsproxy=1 is for a WebSocket client in "
         "TLS it verifies (allowed with type=2 and tls=2, sni= or ca=)"),
        ("client://h:1/h:2?tlsproxy=1&type=2&tls=1", "query: tlsproxy=1 is for a WebSocket"),
        ("server://h:1/h:2?tlsproxy=1", "unknown parameter 'tlsproxy'"),
        ("server://h:1/h:2?type=4", "bad value '4' for 'type' (allowed: 0 (TCP), 1 (QUIC), "
         "2 (WebSocket) or 3 (HTTP/2))"),
        ("server://h:1/h:2?type=2&path=tunnel", "bad value 'tunnel' for 'path' (allowed: an "
         "HTTP path like /tunnel, for type=2 or 3)"),
        ("master://h:1/api?np=/api", "query: np=/api would overlap the API at /api/v1"),
        ("master://h:1/api?np=/api/v1/x", "would overlap the API at /api/v1"),
        ("master://h:1/api?np=np", "bad value 'np' for 'np' (allowed: a path like /api/np"),
        ("server://h:1/h:2?mode=3", "bad value '3' for 'mode' (allowed: 0|1|2)"),
        ("client://h:1/h:2?mode=single", "bad value 'single' for 'mode' (allowed: 0|1|2)"),
        ("server://h:1/h:2?rate=-1", "bad value '-1' for 'rate' (allowed: 0-100000 Mbit/s"),
        ("server://h:1/h:2?rate=1.5", "bad value '1.5' for 'rate'"),
        ("server://h:1/h:2?rate=100001", "bad value '100001' for 'rate'"),
        ("client://h:1/h:2?slot=x", "bad value 'x' for 'slot' (allowed: 0-1000000 connections"),
        ("client://h:1/h:2?read=10", "bad value '10' for 'read' (allowed: a duration like 30s"),
        ("client://h:1/h:2?read=9999h", "bad value '9999h' for 'read'"),
        ("server://h:1/h:2?proxy=3", "bad value '3' for 'proxy' (allowed: 0|1|2)"),
        ("server://h:1/h:2?dial=eth0", "bad value 'eth0' for 'dial' (allowed: auto or a local IP"),
        ("client://h:1/h:2?notcp=yes", "bad value 'yes' for 'notcp' (allowed: 0|1)"),
        ("client://h:1/h:2?notcp=1&noudp=1", "notcp=1 and noudp=1 together leave nothing"),
        ("client://h:1/h:2,", "target address: empty entry in the list"),
        ("client://h:1/127.0.0.1:2,[::1]:3?dial=127.0.0.2",
         "query: dial=127.0.0.2 is IPv4 but target [::1]:3 is IPv6; use auto or an IPv6 address"),
        ("client://h:1/h:2,h", "target address #2: missing port in 'h'"),
        ("client://h:1/h:2,h:2", "the same target is listed twice"),
        ("server://h:1/h:2,h:3?mode=1", "a server in mode=1 listens on its target"),
        ("master://h:1/api?rate=1", "unknown parameter 'rate' for master://"),
        ("server://h:1/h:2?tls=3", "query: bad value '3' for 'tls' (allowed: 0|1|2)"),
        ("server://h:1/h:2?tls=", "query: bad value '' for 'tls'"),
        ("server://h:1/h:2?tls", "query: parameter 'tls' needs a value (allowed: 0|1|2)"),
        ("server://h:1/h:2?log=verbose",
         "query: bad value 'verbose' for 'log' (allowed: debug|info|warn|error|fatal|none)"),
        ("server://h:1/h:2?log=info&log=debug", "query: parameter 'log' given twice"),
        ("server://h:1/h:2?log=info&", "query: empty parameter"),
        ("server://h:1/h:2?tls=2", "query: tls=2 needs crt and key"),
        ("server://h:1/h:2?tls=2&crt=/x", "query: tls=2 needs key"),
        ("server://h:1/h:2?tls=1&crt=/x&key=/y", "only used with tls=2"),
        ("server://h:1/h:2?tls=2&crt=/nonexistent/c.pem&key=/nonexistent/k.pem",
         "query: crt file '/nonexistent/c.pem' does not exist"),
        ("client://h:1/h:2?tls=3", "bad value '3' for 'tls' (allowed: 0|1|2)"),
        ("client://h:1/h:2?tls=1&sni=example.com",
         "query: sni= means a verified certificate, tls=2, not tls=1"),
        ("client://h:1/h:2?crt=/x", "certificates are set on the server"),
        ("master://k@h:1", "master: a key before '@' is not allowed"),
        ("master://h:1/a b", "contains white space"),
        ("master://h:1/a%20b", "API prefix: '/a%20b' is not allowed"),
        ("master://h:1//x", "API prefix"),
        ("master://h:1/api?tls=1&auth=x", "bad value 'x' for 'auth' (allowed: 0|1)"),
        ("master://h:1/api?persist=2", "bad value '2' for 'persist' (allowed: 0|1)"),
        ("master://h:1/api?perist=0", "unknown parameter 'perist'"),
        ("server://h:1/h:2#frag", "'#fragment' is not allowed"),
    ]

    def test_table(self):
        for text, fragment in self.table:
            with self.assertRaises(URLError, msg=text) as caught:
                parse(text)
            message = str(caught.exception)
            self.assertIn(fragment, message, text)
            self.assertNotIn("\n", message)

    def test_unreadable_file(self):
        crt, key = _pem_files(self)
        os.chmod(key, 0)
        url = f"server://h:1/h:2?tls=2&crt={crt}&key={key}"
        if os.geteuid() != 0:
            with self.assertRaises(URLError) as caught:
                parse(url)
            message = str(caught.exception)
        else:
            message = _parse_as_nobody(url, [os.path.dirname(key), crt])
        self.assertIn(f"query: key file {key!r} is not readable", message)

    def test_dotted_prefix_refused(self):
        for prefix in ("/.", "/..", "/api/../x"):
            with self.assertRaises(URLError, msg=prefix):
                parse(f"master://h:1{prefix}")

    def test_directory_is_not_a_file(self):
        with self.assertRaises(URLError) as caught:
            parse("server://h:1/h:2?tls=2&crt=/&key=/")
        self.assertIn("crt file '/' does not exist or is not a file", str(caught.exception))


_hosts = st.one_of(
    st.ip_addresses(v=4).map(str),
    st.ip_addresses(v=6).map(str),
    st.from_regex(r"[a-z]([a-z0-9-]{0,10}[a-z0-9])?(\.[a-z]{1,6}){0,2}", fullmatch=True),
)
_addresses = st.builds(Address, _hosts, st.integers(1, 65535))
_keys = st.none() | st.text(st.characters(exclude_categories=("Cs",)), min_size=1, max_size=20)
_levels = st.sampled_from(["debug", "info", "warn", "error", "fatal", "none"])
_controls = {
    "rate": st.integers(0, 100_000),
    "slot": st.integers(0, 1_000_000),
    "read": st.sampled_from([0.0, 0.5, 30.0, 5400.0]),
    "proxy": st.sampled_from([0, 1, 2]),
    "dial": st.just("auto"),
    "notcp": st.sampled_from([0, 1]),
}
_targets = st.lists(_addresses, min_size=1, max_size=4, unique=True)
_configs = st.one_of(
    st.builds(ServerConfig, tunnel=_addresses, target=_addresses, tunnel_key=_keys,
              log=_levels, tls=st.sampled_from([0, 1]), mode=st.sampled_from([0, 2]),
              **_controls),
    st.builds(lambda targets, **kw: ClientConfig(target=targets[0], more_targets=tuple(targets[1:]),
                                                 **kw),
              tunnel=_addresses, targets=_targets, tunnel_key=_keys, log=_levels,
              mode=st.sampled_from([0, 1, 2]), **_controls),
    st.builds(MasterConfig, api=_addresses, log=_levels, tls=st.sampled_from([0, 1]),
              prefix=st.from_regex(r"(/[A-Za-z0-9_~-][A-Za-z0-9._~-]{0,7}){1,3}", fullmatch=True)),
)


class RoundTrip(SynchronousTestCase):
    @settings(max_examples=300, deadline=None)
    @given(_configs)
    def test_parse_format_round_trip(self, config):
        self.assertEqual(parse(format_url(config)), config)

    def test_round_trip_with_files(self):
        crt, key = _pem_files(self)
        config = ServerConfig(tunnel=Address("h", 1), target=Address("h", 2), tls=2,
                              crt=crt, key=key)
        self.assertEqual(parse(format_url(config)), config)

    @settings(max_examples=300, deadline=None)
    @given(st.text(max_size=80))
    def test_arbitrary_text_parses_or_is_refused(self, text):
        try:
            config = parse(text)
        except URLError as e:
            self.assertNotIn("\n", str(e))
        else:
            self.assertEqual(parse(format_url(config)), config)


class Redacted(SynchronousTestCase):
    def test_a_key_is_masked_and_nothing_else_changes(self):
        from nodepass.url import redacted

        table = {
            "server://s3cr%40t@0.0.0.0:10101/127.0.0.1:8080?tls=1":
                "server://****@0.0.0.0:10101/127.0.0.1:8080?tls=1",
            "client://k@[::1]:1/a:2,b:3": "client://****@[::1]:1/a:2,b:3",
            "server://0.0.0.0:10101/127.0.0.1:8080": "server://0.0.0.0:10101/127.0.0.1:8080",
            "master://127.0.0.1:9090/api?tls=1": "master://127.0.0.1:9090/api?tls=1",
            "server://h:1/t:2?key=/etc/k.pem&crt=/a@b": "server://h:1/t:2?key=/etc/k.pem&crt=/a@b",
        }
        for url, shown in table.items():
            self.assertEqual(redacted(url), shown, url)
