"""Certificates and TLS contexts: make, load, reload, fingerprint, verify.

- tls=1: a fresh self-signed ECDSA P-256 certificate made in memory at start.
  Clients cannot check it against a CA; the server attests its fingerprint with
  the tunnel key during the handshake and clients pin it.
- tls=2: the ``crt``/``key`` PEM files, checked at start (readable, PEM, key
  matching the certificate), re-read every RELOAD_INTERVAL and on SIGHUP.
  Clients verify the chain (system trust store or ``ca=FILE``) and the name
  (the server's host, or ``sni=NAME``) with service_identity.

TLS 1.3 is the minimum everywhere.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import signal
import threading
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from OpenSSL import SSL, crypto
from service_identity import VerificationError
from service_identity.cryptography import (
    verify_certificate_hostname,
    verify_certificate_ip_address,
)
from twisted.application.service import Service
from twisted.internet import ssl
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.internet.task import LoopingCall
from zope.interface import implementer

from nodepass import logs

SELF_SIGNED_DAYS = 365
_MIN = {"raiseMinimumTo": ssl.TLSVersion.TLSv1_3}


class TLSConfigError(ValueError):
    """A certificate or key nodepass refuses; ``str()`` is one line for the user."""


@dataclass(frozen=True)
class Credentials:
    chain: tuple[x509.Certificate, ...]  # leaf first
    key: Any

    @property
    def leaf(self) -> x509.Certificate:
        return self.chain[0]

    @property
    def fingerprint(self) -> bytes:
        return fingerprint(self.leaf)

    def server_options(self) -> ssl.CertificateOptions:
        return ssl.CertificateOptions(
            privateKey=crypto.PKey.from_cryptography_key(self.key),
            certificate=crypto.X509.from_cryptography(self.leaf),
            extraCertChain=[crypto.X509.from_cryptography(c) for c in self.chain[1:]],
            **_MIN,
        )

    def pem(self) -> tuple[bytes, bytes]:
        certs = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in self.chain)
        key = self.key.private_bytes(serialization.Encoding.PEM,
                                     serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption())
        return certs, key


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
        self.credentials = credentials
        self.options = credentials.server_options()
        self.options.getContext()  # build now: a bad key fails here, not per connection

    def current(self) -> tuple[ssl.CertificateOptions, bytes]:
        return self.options, self.credentials.fingerprint

    def getContext(self) -> SSL.Context:
        """For TLS listeners: each new connection gets the current certificate."""
        return self.options.getContext()

    def reload(self) -> bool:
        """Re-read the files; on any problem keep the old certificate and log why."""
        if self.crt is None or self.key is None:
            return False
        try:
            fresh = load_credentials(self.crt, self.key)
            if fresh.fingerprint == self.credentials.fingerprint:
                return False
            self._set(fresh)
        except (TLSConfigError, SSL.Error) as e:
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


def pinning_options() -> ssl.CertificateOptions:
    """tls=1: accept the TLS layer's certificate; the handshake's attestation pins it."""
    return ssl.CertificateOptions(verify=False, **_MIN)


def verifying_options(hostname: str, ca_path: str | None) -> IOpenSSLClientConnectionCreator:
    """tls=2: chain against the system trust store or ``ca_path``; name by service_identity."""
    if ca_path is None:
        trust = ssl.platformTrust()
    else:
        data = _read(ca_path, "ca")
        try:
            certs = x509.load_pem_x509_certificates(data)
        except ValueError:
            raise TLSConfigError(f"ca file {ca_path!r} holds no PEM certificate") from None
        trust = ssl.trustRootFromCertificates(
            [ssl.Certificate(crypto.X509.from_cryptography(c)) for c in certs])
    return ssl.optionsForClientTLS(hostname, trustRoot=trust, extraCertificateOptions=_MIN)


@implementer(IOpenSSLClientConnectionCreator)
class VerifyingCreator:
    """tls=2 for one connection: OpenSSL checks the chain, service_identity the name,
    and every reason for a refusal is kept so the log can say "expired" or
    "unknown CA" rather than "handshake failure"."""

    def __init__(self, inner: IOpenSSLClientConnectionCreator, hostname: str) -> None:
        self._inner = inner
        self._hostname = hostname
        self.problems: list[str] = []

    def clientConnectionForTLS(self, tls_protocol: Any) -> SSL.Connection:
        # The inner creator sets SNI and the trust roots; its verify callback (which
        # would check the name) is replaced by ours, which checks the name itself.
        connection = self._inner.clientConnectionForTLS(tls_protocol)
        connection.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, self._verify)
        return connection

    def _verify(self, conn: Any, cert: Any, errno: int, depth: int, ok: int) -> bool:
        if not ok:
            self.problems.append(_VERIFY_REASONS.get(errno, f"verify error {errno}"))
            return False
        if depth != 0:
            return True
        try:
            _check_name(cert.to_cryptography(), self._hostname)
        except VerificationError:
            self.problems.append(f"the certificate does not match the name {self._hostname!r}"
                                 " (hostname mismatch; set sni=NAME to verify another name)")
            return False
        return True


def _check_name(cert: x509.Certificate, hostname: str) -> None:
    try:
        ipaddress.ip_address(hostname)
    except ValueError:
        verify_certificate_hostname(cert, hostname)
    else:
        verify_certificate_ip_address(cert, hostname)


def peer_fingerprint(transport: Any) -> bytes | None:
    cert = transport.getPeerCertificate()
    if cert is None:
        return None
    return fingerprint(cert.to_cryptography())


class CertificateReloader(Service):
    """Re-reads tls=2 files every RELOAD_INTERVAL and on SIGHUP."""

    def __init__(self, reactor: Any, credentials: ServerCredentials, interval: float) -> None:
        self.reactor = reactor
        self.credentials = credentials
        self._loop = LoopingCall(credentials.reload)
        self._loop.clock = reactor
        self.interval = interval
        self._previous: Any = None

    def startService(self) -> None:
        super().startService()
        self._loop.start(self.interval, now=False)
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGHUP, self._on_sighup)

    def _on_sighup(self, signum: int, frame: Any) -> None:
        self.reactor.callFromThread(self.credentials.reload)

    def stopService(self) -> None:
        super().stopService()
        if self._loop.running:
            self._loop.stop()
        if self._previous is not None:
            signal.signal(signal.SIGHUP, self._previous)
            self._previous = None
