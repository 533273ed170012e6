"""Certificates and TLS contexts: make, load, reload, fingerprint, verify.

- tls=1: a fresh self-signed ECDSA P-256 certificate made in memory at start.
  Clients cannot check it against a CA; the server attests its fingerprint with
  the tunnel key during the handshake and clients pin it.
- tls=2: the ``crt``/``key`` PEM files, checked at start (readable, PEM, key
  matching the certificate), re-read every RELOAD_INTERVAL and on SIGHUP.
  Clients verify the chain (system trust store or ``ca=FILE``) and the name
  (the server's host, or ``sni=NAME``) with OpenSSL's own checks.

Tunnel connections use the standard library's ``ssl`` contexts (see
nodepass/tunnel/tls_transport.py); the master's HTTPS listener uses Twisted's
pyOpenSSL options, made only when it asks for them.  TLS 1.3 is the minimum
everywhere.
"""

from __future__ import annotations

import contextvars
import datetime
import hashlib
import os
import signal
import ssl
import tempfile
import threading
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.application.service import Service
from twisted.internet.task import LoopingCall

from nodepass import logs

SELF_SIGNED_DAYS = 365


class TLSConfigError(ValueError):
    """A certificate or key nodepass refuses; ``str()`` is one line for the user."""


@dataclass(frozen=True)
class Credentials:
    chain: tuple[x509.Certificate, ...]  # leaf first
    key: Any

    @property
    def leaf(self) -> x509.Certificate:
        return self.chain[0]

    @cached_property
    def fingerprint(self) -> bytes:
        return fingerprint(self.leaf)

    def server_options(self) -> Any:
        """Twisted's pyOpenSSL options (the master's HTTPS listener)."""
        from OpenSSL import crypto
        from twisted.internet import ssl as tssl

        return tssl.CertificateOptions(
            privateKey=crypto.PKey.from_cryptography_key(self.key),
            certificate=crypto.X509.from_cryptography(self.leaf),
            extraCertChain=[crypto.X509.from_cryptography(c) for c in self.chain[1:]],
            raiseMinimumTo=tssl.TLSVersion.TLSv1_3,
        )

    def server_context(self) -> ssl.SSLContext:
        """The standard library's context a tunnel server accepts TLS with."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_3
        # One (stateless) ticket per connection: the client resumes its next data
        # connections' TLS with the latest, which spares both ends the certificate and
        # its signature (a handshake costs the client half as much).
        context.num_tickets = 1
        context.options &= ~ssl.OP_ENABLE_MIDDLEBOX_COMPAT
        # type=3 clients ask for h2 (a proxy routing by ALPN sees HTTP/2); the others
        # ask for nothing and get nothing
        context.set_alpn_protocols(["h2"])
        certs, key = self.pem()
        _load_chain(context, certs + key)
        return context

    def pem(self) -> tuple[bytes, bytes]:
        certs = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in self.chain)
        key = self.key.private_bytes(serialization.Encoding.PEM,
                                     serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption())
        return certs, key


def _load_chain(context: ssl.SSLContext, pem: bytes) -> None:
    """``load_cert_chain`` reads only files: the PEM goes to an anonymous file in
    memory (memfd), or where there is none to a private temporary directory, for the
    time of the call."""
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("nodepass-credentials", os.MFD_CLOEXEC)
        try:
            with os.fdopen(os.dup(fd), "wb") as f:
                f.write(pem)
            context.load_cert_chain(f"/proc/self/fd/{fd}")
        finally:
            os.close(fd)
        return
    with tempfile.TemporaryDirectory(prefix="nodepass-") as private:  # 0700
        path = os.path.join(private, "credentials.pem")
        with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as f:
            f.write(pem)
        context.load_cert_chain(path)


def fingerprint(cert: x509.Certificate) -> bytes:
    """SHA-256 of the certificate's DER encoding."""
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).digest()


def fingerprint_text(digest: bytes) -> str:
    return ":".join(f"{b:02X}" for b in digest)


def make_self_signed(now: datetime.datetime, name: str = "nodepass") -> Credentials:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=SELF_SIGNED_DAYS))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    return Credentials((cert,), key)


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise TLSConfigError(f"{what} file {path!r} cannot be read ({e.strerror})") from None


def load_credentials(crt_path: str, key_path: str) -> Credentials:
    """Read and check a PEM certificate chain and its private key."""
    crt_data, key_data = _read(crt_path, "crt"), _read(key_path, "key")
    try:
        chain = tuple(x509.load_pem_x509_certificates(crt_data))
    except ValueError:
        raise TLSConfigError(f"crt file {crt_path!r} holds no PEM certificate") from None
    try:
        key = serialization.load_pem_private_key(key_data, password=None)
    except TypeError:
        raise TLSConfigError(f"key file {key_path!r} is encrypted; nodepass needs an "
                             "unencrypted PEM key") from None
    except (ValueError, Exception) as e:  # cryptography raises several kinds
        if isinstance(e, TLSConfigError):
            raise
        raise TLSConfigError(f"key file {key_path!r} holds no PEM private key") from None
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    if (key.public_key().public_bytes(serialization.Encoding.DER, public)
            != chain[0].public_key().public_bytes(serialization.Encoding.DER, public)):
        raise TLSConfigError(
            f"key file {key_path!r} does not match the certificate in {crt_path!r}")
    return Credentials(chain, key)


def describe_validity(cert: x509.Certificate, now: datetime.datetime) -> str | None:
    """A warning when ``cert`` is not valid at ``now``, else None."""
    if now < cert.not_valid_before_utc:
        return f"the certificate is not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M}Z"
    if now > cert.not_valid_after_utc:
        return f"the certificate expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M}Z"
    return None


class ServerCredentials:
    """The server's current certificate: made (tls=1) or read and re-read (tls=2).

    New connections take :meth:`current`; live ones keep the context they began with.
    """

    log = logs.logger("nodepass")

    def __init__(self, credentials: Credentials, crt: str | None = None,
                 key: str | None = None) -> None:
        self.crt, self.key = crt, key
        self._set(credentials)

    def _set(self, credentials: Credentials) -> None:
        # built now: a bad key fails here, not per connection
        self.context = credentials.server_context()
        self.credentials = credentials
        self._options: Any = None

    def current(self) -> tuple[ssl.SSLContext, bytes]:
        """The context a new tunnel connection takes, and its certificate's fingerprint."""
        return self.context, self.credentials.fingerprint

    def getContext(self) -> Any:
        """For the master's HTTPS listener (pyOpenSSL): each new connection gets the
        current certificate."""
        if self._options is None:
            self._options = self.credentials.server_options()
        return self._options.getContext()

    def reload(self) -> bool:
        """Re-read the files; on any problem keep the old certificate and log why."""
        if self.crt is None or self.key is None:
            return False
        try:
            fresh = load_credentials(self.crt, self.key)
            if fresh.fingerprint == self.credentials.fingerprint:
                return False
            self._set(fresh)
        except (TLSConfigError, ssl.SSLError) as e:
            self.log.error("certificate reload failed, keeping the current one: {why}", why=e)
            return False
        self.log.info("certificate reloaded from {crt}: fingerprint {fp}", crt=self.crt,
                      fp=fingerprint_text(self.credentials.fingerprint))
        return True


# ---------------------------------------------------------------------------
# Client side

_VERIFY_REASONS = {
    2: "unable to get the issuer certificate",
    9: "the certificate is not yet valid",
    10: "the certificate has expired",
    18: "the certificate is self-signed and not trusted",
    19: "a self-signed certificate is in the chain and not trusted",
    20: "the certificate's issuer is not trusted (unknown CA)",
    21: "unable to verify the first certificate",
    62: "the certificate does not match the host name",
}


@dataclass
class ClientTLS:
    """What a client dials TLS with: its context, the name it verifies (None when it
    pins the certificate instead, tls=1), and the latest TLS session the server gave a
    ticket for (the next connection resumes it)."""

    context: ssl.SSLContext
    hostname: str | None
    session: ssl.SSLSession | None = None

    def remember(self, transport: Any) -> None:
        """Keep ``transport``'s TLS session, once its ticket came, for the next dial — if
        this context made it (ssl refuses a session of another context)."""
        made_by = getattr(transport, "tls_context", None)
        if made_by is None or made_by() is not self.context:
            return
        if self.session is not None and transport.tls_resumed():
            return  # (taking a session out of ssl copies it: 0.1 ms)
        session = transport.tls_session()
        if session is not None and session.has_ticket:
            self.session = session

    def describe(self, error: ssl.SSLError) -> str:
        """Why the handshake failed, in words: "expired", "unknown CA", a wrong name."""
        if isinstance(error, ssl.SSLCertVerificationError):
            if error.verify_code in (62, 64):  # the host name, the IP address
                return (f"the certificate does not match the name {self.hostname!r} "
                        "(hostname mismatch; set sni=NAME to verify another name)")
            return _VERIFY_REASONS.get(error.verify_code,
                                       error.verify_message or f"verify error {error.verify_code}")
        return error.reason or str(error)


def _client_context(alpn: tuple[str, ...]) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.options &= ~ssl.OP_ENABLE_MIDDLEBOX_COMPAT
    if alpn:
        context.set_alpn_protocols(list(alpn))
    return context


def pinning_tls(alpn: tuple[str, ...] = ()) -> ClientTLS:
    """tls=1: accept the TLS layer's certificate; the handshake's attestation pins it.
    ``alpn``: the protocols to ask for (``("h2",)`` for the HTTP/2 pool)."""
    context = _client_context(alpn)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return ClientTLS(context, None)


def verifying_tls(hostname: str, ca_path: str | None, alpn: tuple[str, ...] = ()
                  ) -> ClientTLS:
    """tls=2: the chain against the system trust store or ``ca_path``; the name (a DNS
    name or an IP address) by OpenSSL."""
    context = _client_context(alpn)
    if ca_path is None:
        context.load_default_certs()
    else:
        data = _read(ca_path, "ca")
        try:
            certs = x509.load_pem_x509_certificates(data)
        except ValueError:
            raise TLSConfigError(f"ca file {ca_path!r} holds no PEM certificate") from None
        context.load_verify_locations(
            cadata="".join(c.public_bytes(serialization.Encoding.PEM).decode() for c in certs))
    return ClientTLS(context, hostname)


def peer_fingerprint(transport: Any) -> bytes | None:
    """SHA-256 of the certificate the peer of a tunnel connection showed."""
    der = transport.peer_certificate()
    if der is None:
        return None
    return hashlib.sha256(der).digest()


class _Hangup:
    """One SIGHUP handler for every reloader of the process (a host runs several): each
    reloads in the context it started in (its instance's scope), on its reactor."""

    def __init__(self) -> None:
        self.reloaders: dict[CertificateReloader, contextvars.Context] = {}
        self.previous: Any = None

    def add(self, reloader: CertificateReloader) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        if not self.reloaders:
            self.previous = signal.signal(signal.SIGHUP, self._on_sighup)
        self.reloaders[reloader] = contextvars.copy_context()

    def remove(self, reloader: CertificateReloader) -> None:
        if self.reloaders.pop(reloader, None) is not None and not self.reloaders:
            signal.signal(signal.SIGHUP, self.previous)

    def _on_sighup(self, signum: int, frame: Any) -> None:
        for reloader, context in list(self.reloaders.items()):
            context.run(reloader.reactor.callFromThread, reloader.credentials.reload)


_hangup = _Hangup()


class CertificateReloader(Service):
    """Re-reads tls=2 files every RELOAD_INTERVAL and on SIGHUP."""

    def __init__(self, reactor: Any, credentials: ServerCredentials, interval: float) -> None:
        self.reactor = reactor
        self.credentials = credentials
        self._loop = LoopingCall(credentials.reload)
        self._loop.clock = reactor
        self.interval = interval

    def startService(self) -> None:
        super().startService()
        self._loop.start(self.interval, now=False)
        _hangup.add(self)

    def stopService(self) -> None:
        super().stopService()
        if self._loop.running:
            self._loop.stop()
        _hangup.remove(self)
