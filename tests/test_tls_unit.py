"""Certificates: made, loaded, checked, reloaded."""

import shutil
import tempfile
from pathlib import Path

from twisted.internet.task import Clock
from twisted.logger import capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase

from nodepass import tls
from tests import certs


class Certificates(SynchronousTestCase):
    def setUp(self):
        self.dir = Path(tempfile.mkdtemp())
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.ca = certs.make_ca()

    def test_self_signed_is_ecdsa_and_valid_now(self):
        made = tls.make_self_signed(certs.NOW)
        self.assertIsNone(tls.describe_validity(made.leaf, certs.NOW))
        self.assertEqual(made.key.curve.name, "secp256r1")
        self.assertEqual(len(made.fingerprint), 32)
        made.server_options().getContext()

    def test_load_chain_and_key(self):
        leaf = certs.issue(self.ca)
        crt, key = leaf.write(self.dir, "s", chain=(self.ca.cert,))
        loaded = tls.load_credentials(crt, key)
        self.assertEqual(len(loaded.chain), 2)
        self.assertEqual(loaded.fingerprint, tls.fingerprint(leaf.cert))

    def test_expired_is_described(self):
        old = certs.issue(self.ca, expired=True)
        self.assertIn("expired on", tls.describe_validity(old.cert, certs.NOW))

    def test_reload_keeps_the_old_certificate_when_the_new_file_is_broken(self):
        crt, key = certs.issue(self.ca).write(self.dir, "s")
        current = tls.ServerCredentials(tls.load_credentials(crt, key), crt, key)
        before = current.current()[1]
        self.assertFalse(current.reload())  # unchanged files: nothing to do
        Path(key).write_text("broken")
        with capturedLogs() as events:
            self.assertFalse(current.reload())
        self.assertEqual(current.current()[1], before)
        self.assertIn("certificate reload failed, keeping the current one",
                      " ".join(formatEvent(e) for e in events))
        renewed = certs.issue(self.ca)
        renewed.write(self.dir, "s")
        self.assertTrue(current.reload())
        self.assertEqual(current.current()[1], tls.fingerprint(renewed.cert))

    def test_reloader_rereads_every_interval(self):
        crt, key = certs.issue(self.ca).write(self.dir, "s")
        current = tls.ServerCredentials(tls.load_credentials(crt, key), crt, key)
        clock = Clock()
        reloader = tls.CertificateReloader(clock, current, 3600.0)
        reloader.startService()
        self.addCleanup(reloader.stopService)
        renewed = certs.issue(self.ca)
        renewed.write(self.dir, "s")
        clock.advance(3599)
        self.assertNotEqual(current.current()[1], tls.fingerprint(renewed.cert))
        clock.advance(1)
        self.assertEqual(current.current()[1], tls.fingerprint(renewed.cert))

    def test_sighup_reloads_every_reloader_of_the_process_each_in_its_scope(self):
        import signal

        from nodepass import logs

        class Reactor(Clock):
            def __init__(self):
                super().__init__()
                self.from_thread = []

            def callFromThread(self, f, *args):
                self.from_thread.append((logs.current_scope.get(), f))

        scopes = [logs.Scope(), logs.Scope()]
        reactor = Reactor()
        reloaders = []
        for n, scope in enumerate(scopes):  # two instances in one host
            crt, key = certs.issue(self.ca).write(self.dir, f"s{n}")
            current = tls.ServerCredentials(tls.load_credentials(crt, key), crt, key)
            reloaders.append(tls.CertificateReloader(reactor, current, 3600.0))
            scope.run(reloaders[-1].startService)
        before = signal.getsignal(signal.SIGHUP)
        tls._hangup._on_sighup(signal.SIGHUP, None)
        expected = [(scope, r.credentials.reload)
                    for scope, r in zip(scopes, reloaders, strict=True)]
        self.assertEqual(reactor.from_thread, expected)
        reloaders[0].stopService()  # the other still hears SIGHUP
        self.assertEqual(signal.getsignal(signal.SIGHUP), before)
        reloaders[1].stopService()
        self.assertNotEqual(signal.getsignal(signal.SIGHUP), before)  # the previous one back


def _handshake_in_memory(client_context, server_context) -> tuple:
    """A TLS handshake between two SSLObjects over memory BIOs: (client, server)."""
    import ssl

    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    client = client_context.wrap_bio(c_in, c_out, server_side=False)
    server = server_context.wrap_bio(s_in, s_out, server_side=True)
    for _ in range(10):
        for end in (client, server):
            try:
                end.do_handshake()
            except ssl.SSLWantReadError:
                pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
    return client, server


class Alpn(SynchronousTestCase):
    """The HTTP/2 pool asks for h2 (a proxy routing by ALPN sees HTTP/2); nothing else
    asks for a protocol, and the server names none to them."""

    def test_h2_is_negotiated_only_when_asked_for(self):
        import datetime

        server_context = tls.make_self_signed(
            datetime.datetime.now(datetime.UTC)).server_context()
        client, server = _handshake_in_memory(tls.pinning_tls(("h2",)).context, server_context)
        self.assertEqual((client.selected_alpn_protocol(), server.selected_alpn_protocol()),
                         ("h2", "h2"))
        client, server = _handshake_in_memory(tls.pinning_tls().context, server_context)
        self.assertIsNone(client.selected_alpn_protocol())
        self.assertIsNone(server.selected_alpn_protocol())
