"""The master's URL parameters for browsers and keyless use (#16 item 7): ``hosts=``,
``origins=``, ``insecure=``, and ``auth=0`` only on a loopback address unless the
operator insists -- read, written back, and refused with one line naming the fix."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from nodepass.url import Address, MasterConfig, URLError, format_url, parse
from tests.procs import clean_env, run_nodepass


class Parameters(SynchronousTestCase):
    def test_read_normalised_and_written_back(self):
        config = parse("master://127.0.0.1:9090?hosts=Api.Example.COM.,10.0.0.5,[::1]"
                       "&origins=HTTPS://Panel.Example.com:443,http://127.0.0.1:5173,"
                       "http://[::1]:80")
        self.assertEqual(config.hosts, ("api.example.com", "10.0.0.5", "::1"))
        self.assertEqual(config.origins, ("https://panel.example.com", "http://127.0.0.1:5173",
                                          "http://[::1]"))
        written = format_url(config)
        self.assertTrue(written.endswith("&hosts=api.example.com,10.0.0.5,[::1]&origins="
                                         "https://panel.example.com,http://127.0.0.1:5173,"
                                         "http://[::1]"), written)
        self.assertEqual(parse(written), config)
        # the defaults are left out, as before
        self.assertEqual(format_url(parse("master://127.0.0.1:9090")),
                         "master://127.0.0.1:9090/api?log=info&tls=0&auth=1&persist=1")

    def test_auth_0_on_loopback(self):
        for host in ("127.0.0.1", "127.0.0.2", "[::1]", "localhost", "LocalHost"):
            self.assertEqual(parse(f"master://{host}:9090?auth=0").auth, 0, host)

    def test_auth_0_elsewhere_only_with_insecure(self):
        config = parse("master://0.0.0.0:9090?auth=0&insecure=1")
        self.assertEqual((config.api, config.auth, config.insecure),
                         (Address("0.0.0.0", 9090), 0, 1))
        self.assertEqual(parse(format_url(config)), config)
        self.assertTrue(format_url(config).endswith("&auth=0&persist=1&insecure=1"))

    def test_refusals(self):
        table = [
            ("master://0.0.0.0:9090?auth=0",
             "query: auth=0 on 0.0.0.0:9090 would let anyone who can reach that address run "
             "programs through the API (allowed: auth=0 on a loopback address such as "
             "127.0.0.1 or localhost; to serve without a key there anyway, add insecure=1)"),
            ("master://[::]:9090?auth=0", "auth=0 on [::]:9090 would let anyone"),
            ("master://10.0.0.5:9090?auth=0", "add insecure=1"),
            ("master://api.example.com:9090?auth=0", "add insecure=1"),
            ("master://0.0.0.0:9090?insecure=1",
             "query: insecure=1 only goes with auth=0"),
            ("master://h:1?auth=0&insecure=2", "bad value '2' for 'insecure' (allowed: 0|1)"),
            ("master://h:1?hosts=", "query: bad value '' for 'hosts' (allowed: names this "
                                    "master answers to"),
            ("master://h:1?origins=", "bad value '' for 'origins' (allowed: browser origins"),
            ("master://h:1?hosts=a,,b", "query: hosts= has an empty entry (stray ',')"),
            ("master://h:1?hosts=a,A.", "query: hosts= lists the same entry twice"),
            ("master://h:1?hosts=a:80", "query: hosts: 'a:80' has a port or is an IPv6 "
                                        "address without brackets"),
            ("master://h:1?hosts=::1", "without brackets"),
            ("master://h:1?hosts=*.example.com", "query: hosts: '*.example.com' is not a "
                                                 "valid host"),
            ("master://h:1?hosts=" + ",".join(f"h{i}" for i in range(65)),
             "query: hosts= lists 65 entries (allowed: at most 64)"),
            ("master://h:1?origins=*", "query: origins=* is not allowed (list the panels' "
                                       "origins"),
            ("master://h:1?origins=null", "origins=null is not allowed"),
            ("master://h:1?origins=panel.example.com", "query: origins: 'panel.example.com' "
                                                       "is not an origin (allowed: "
                                                       "scheme://host[:port]"),
            ("master://h:1?origins=ftp://x", "is not an origin"),
            ("master://h:1?origins=https://x/", "query: origins: 'https://x/' has a path, "
                                                "query or user name"),
            ("master://h:1?origins=https://u@x", "has a path, query or user name"),
            ("master://h:1?origins=http://x:0", "query: origins: 'http://x:0': port 0 is out "
                                                "of range"),
            ("master://h:1?origins=http://::1", "an IPv6 address without brackets"),
            ("master://h:1?origins=http://[::1", "is not an origin"),
            ("master://h:1?origins=http://a_b", "'a_b' is not a valid host"),
            ("master://h:1?origins=http://x,http://X:80", "lists the same entry twice"),
        ]
        for text, fragment in table:
            with self.assertRaises(URLError, msg=text) as caught:
                parse(text)
            self.assertIn(fragment, str(caught.exception), text)
            self.assertNotIn("\n", str(caught.exception))

    def test_the_defaults(self):
        config = MasterConfig()
        self.assertEqual((config.hosts, config.origins, config.insecure), ((), (), 0))

    def test_the_command_refuses_auth_0_on_every_interface_before_it_starts(self):
        done = run_nodepass("master://0.0.0.0:0?auth=0", env=clean_env())
        self.assertEqual(done.returncode, 2)
        self.assertEqual(done.stdout, "")
        (line,) = done.stderr.splitlines()
        self.assertTrue(line.startswith("nodepass: error: query: auth=0 on 0.0.0.0:0 would "
                                        "let anyone"), line)
        self.assertTrue(line.endswith("add insecure=1)"), line)
