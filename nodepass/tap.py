"""twistd's entry: the Options and the one makeService that assembles every service
tree (server, client, single-end, master), handing each piece its endpoints.

``nodepass URL``, ``python -m nodepass URL`` and ``twistd -n nodepass URL`` all
come through here.  One rule for what goes wrong at start: whatever the user gave
that cannot be used — the URL, the environment, TLS files, a dial address, the
master's state directory and database — is a usage error, found while the options
are parsed (exit 2, one line naming it); a service that fails once started (a port
taken) stops the process through ``RootService.fail`` (exit 1).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping
from typing import IO, Any

from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.logger import LogLevel
from twisted.python import usage

from nodepass import logs
from nodepass.helptext import USAGE
from nodepass.report import reporter
from nodepass.root import RootService, raise_open_file_limit
from nodepass.stats import Report
from nodepass.statuschannel import ENV, StatusChannel
from nodepass.tls import Credentials, ServerCredentials, TLSConfigError
from nodepass.tunables import TunableError, Tunables, from_environ
from nodepass.url import ClientConfig, Config, MasterConfig, ServerConfig, URLError, parse

BUILT_MODES: tuple[str, ...] = ("server", "client", "master")
URL_ENV = "NODEPASS_URL"
MAX_URL = 16 * 1024  # what '-' reads from standard input at most
MISSING_URL = ("missing URL (server://, client:// or master://): give it as the argument, "
               f"as '-' to read it from standard input, or in {URL_ENV}")


class Options(usage.Options):
    synopsis = "URL"
    longdesc = USAGE

    def __init__(self, environ: Mapping[str, str] | None = None,
                 stdin: IO[str] | None = None) -> None:
        super().__init__()
        self.environ = os.environ if environ is None else environ
        self.stdin = stdin

    def getUsage(self, width: int | None = None) -> str:
        return USAGE

    def parseArgs(self, *urls: str) -> None:
        url = self._url(urls)
        try:
            self["config"] = parse(url)
        except URLError as e:
            raise usage.UsageError(str(e)) from None
        if not isinstance(self["config"], MasterConfig):
            _without_pyopenssl()
        try:
            self["tunables"] = from_environ(self.environ)
        except TunableError as e:
            raise usage.UsageError(f"environment: {e}") from None
        try:
            self["credentials"] = _tls_at_start(self["config"])
        except TLSConfigError as e:
            raise usage.UsageError(str(e)) from None
        _check_dial(self["config"])
        if isinstance(self["config"], MasterConfig):
            _check_state(self["config"], self.environ)
            _check_hosts(self.environ)

    def _url(self, given: tuple[str, ...]) -> str:
        """The URL: the one argument; ``-`` reads it from standard input, and none
        takes it from NODEPASS_URL — both keep a key out of the process list."""
        if len(given) > 1:
            raise usage.UsageError(f"expected one URL, got {len(given)} arguments")
        if not given:
            url = self.environ.get(URL_ENV, "").strip()
            if not url:
                raise usage.UsageError(MISSING_URL)
            return url
        if given[0] != "-":
            return given[0]
        stream = self.stdin if self.stdin is not None else sys.stdin
        line = stream.readline(MAX_URL + 1) if stream is not None else ""
        if len(line) > MAX_URL:
            raise usage.UsageError(f"the URL on standard input is longer than {MAX_URL} "
                                   "characters")
        if not line.strip():
            raise usage.UsageError("'-': no URL on standard input (write one line: "
                                   "server://..., client://... or master://...)")
        return line.strip()

    def postOptions(self) -> None:
        scheme = self["config"].scheme
        if scheme not in BUILT_MODES:
            raise usage.UsageError(f"{scheme} mode is not built yet in this version")


def _without_pyopenssl() -> None:
    """A server or client runs its TLS with the standard library (tls_transport.py), yet
    Twisted's TCP and endpoint modules import pyOpenSSL whenever it is installed, to
    offer a startTLS and TLS endpoints nobody here calls: 4 MiB and 20 ms per process.
    In a process that has not imported them yet (a fresh ``nodepass`` or instance, not
    the master and not a test run), they are told pyOpenSSL is not there."""
    if "twisted.internet.tcp" not in sys.modules and "OpenSSL" not in sys.modules:
        sys.modules["OpenSSL"] = None  # type: ignore[assignment]


def _check_state(config: MasterConfig, environ: Mapping[str, str]) -> None:
    """The state directory, key file and database, checked like TLS files: before
    anything starts, a problem is a usage error (exit 2) naming it."""
    from nodepass.master.state import StateError, check_state
    from nodepass.master.store import StoreError

    try:
        check_state(config, environ)
    except (StateError, StoreError) as e:
        raise usage.UsageError(str(e)) from None


def _check_hosts(environ: Mapping[str, str]) -> None:
    from nodepass.master.hosts import host_settings

    try:
        host_settings(environ)
    except ValueError as e:
        raise usage.UsageError(f"environment: {e}") from None


def _check_dial(config: Config) -> None:
    """``dial=IP`` must be an address of this machine, or every connection would fail."""
    from nodepass.endpoints import bind_problem

    dial = getattr(config, "dial", "auto")
    if dial != "auto" and (why := bind_problem(dial)) is not None:
        raise usage.UsageError(f"query: dial address {dial} cannot be used on this machine "
                               f"({why}); use auto or one of its own addresses")


def _tls_at_start(config: Config) -> Credentials | None:
    """Check every TLS file now, so a bad one stops the start with a clear message."""
    from nodepass import tls

    if isinstance(config, ClientConfig):
        if config.ca is not None:
            tls.verifying_tls("localhost", config.ca)
        return None
    if config.tls == 2:
        assert config.crt is not None and config.key is not None
        return tls.load_credentials(config.crt, config.key)
    return None


def server_credentials(root: RootService, config: ServerConfig | MasterConfig,
                       loaded: Credentials | None,
                       tunables: Tunables) -> ServerCredentials | None:
    """The certificate a server or master serves, and its reloader for tls=2."""
    from datetime import UTC, datetime

    from nodepass import tls

    now = datetime.fromtimestamp(root.reactor.seconds(), UTC)
    if config.tls == 1:
        return tls.ServerCredentials(tls.make_self_signed(now))
    if config.tls == 2:
        assert loaded is not None
        warning = tls.describe_validity(loaded.leaf, now)
        if warning:
            root.log.warn("tls=2: {crt}: {warning}", crt=config.crt, warning=warning)
        credentials = tls.ServerCredentials(loaded, config.crt, config.key)
        tls.CertificateReloader(root.reactor, credentials,
                                tunables.reload_interval).setServiceParent(root)
        return credentials
    return None


def makeService(options: Options, reactor: Any = None,
                root: RootService | None = None) -> RootService:
    """The service tree for the URL in ``options``, on ``reactor`` (the global one
    unless another is handed in: tests run whole trees on a network in memory), under
    ``root`` (a host hands in one that stops one instance, not the process)."""
    if reactor is None:
        from twisted.internet import reactor
    config = options["config"]
    logs.gate.set_level(config.log)
    raise_open_file_limit()
    if root is None:
        root = RootService(reactor)
    if isinstance(config, MasterConfig):
        _master(root, config, options["tunables"], options.get("credentials"), options.environ)
        return root
    build = {"server": _server, "client": _client}[config.scheme]
    built = build(root, config, options["tunables"], options.get("credentials"))
    status_fd = options.environ.get(ENV)
    if status_fd is not None and built is not None:
        snapshot, ready = built
        _report_to_master(root, int(status_fd), snapshot, ready, options["tunables"])
    return root


def _report_to_master(root: RootService, fd: int, snapshot: Callable[[], Report],
                      ready: Deferred[Any], tunables: Tunables) -> None:
    channel = StatusChannel(root.reactor, fd, snapshot, tunables.report_interval, root.stop)
    channel.setServiceParent(root)
    root.log_sink = channel.log_record  # the logs go to the master, as records
    root.on_fail.append(channel.fatal)
    ready.addCallback(lambda ok: channel.ready() if ok else None)


def _master(root: RootService, config: MasterConfig, tunables: Tunables,
            loaded: Credentials | None, environ: Mapping[str, str]) -> None:
    from nodepass.endpoints import ListenerService
    from nodepass.master.events import EventHub
    from nodepass.master.registry import Registry, children_environ
    from nodepass.master.service import RegistryService, announce, api_site, open_state
    from nodepass.master.state import StateError
    from nodepass.master.store import StoreError
    from nodepass.tls import fingerprint_text

    credentials = server_credentials(root, config, loaded, tunables)
    try:
        store, key, folder = open_state(config, environ)
    except (StateError, StoreError) as e:  # changed since it was checked at parse time
        root.reactor.callWhenRunning(root.fail, str(e))
        return
    hub = EventHub(root.reactor, keepalive=max(1.0, min(15.0, 3 * tunables.report_interval)))
    hosts = None
    spawn: dict[str, Any] = {}
    if environ.get("NODEPASS_FORK", "1") != "0":  # (0: each instance a fresh interpreter)
        from nodepass.master.forkserver import ForkServer
        from nodepass.master.hosts import HostPool, host_settings

        forkserver = ForkServer(root.reactor, children_environ(environ))
        hosts = HostPool(root.reactor, forkserver, host_settings(environ))
        spawn["spawn"] = hosts.spawn
    registry = Registry(root.reactor, config, tunables, environ, store, hub, **spawn)
    if store.kind == "postgresql":
        from nodepass.master.fleet import Fleet

        registry.fleet = Fleet(root.reactor, registry, store)
    RegistryService(registry, hosts).setServiceParent(root)
    if credentials is not None:
        root.log.info("tls={mode}: API certificate fingerprint {fp}", mode=config.tls,
                      fp=fingerprint_text(credentials.credentials.fingerprint))
    listener = ListenerService(root.reactor, config.api,
                               api_site(root.reactor, registry, config, key, folder), "API",
                               root.fail, credentials)
    listener.setServiceParent(root)
    listener.listening.addCallbacks(lambda port: announce(config, credentials, port),
                                    lambda _: None)


Built = tuple[Callable[[], Report], Deferred[Any]]


def _server(root: RootService, config: ServerConfig, tunables: Tunables,
            loaded: Credentials | None) -> Built:
    from nodepass.endpoints import listeners
    from nodepass.tunnel.server import REVERSE, ServerTunnel
    from nodepass.tunnel.targets import TargetDialer

    credentials = server_credentials(root, config, loaded, tunables)
    tunnel = ServerTunnel(root.reactor, config, tunables, credentials,
                          TargetDialer.for_config(root.reactor, config, tunables))
    tunnel.setServiceParent(root)
    ready = []
    target: list[Any] = []
    if config.mode != 2 and not config.more_targets:
        # The target listeners start first, and listening on TCP (or UDP) answers at
        # once, so with mode=0 the mode is settled before the tunnel takes a client.
        settle = root.fail if config.mode == 1 else tunnel.cannot_bind_target
        target = listeners(root.reactor, config.target, "target", settle,
                           None if config.notcp else tunnel.target_factory(),
                           None if config.noudp else tunnel.udp,
                           udp_only_if=lambda: tunnel.mode == REVERSE and not root.exit_status)
        for service in target:
            service.setServiceParent(root)
        if config.mode == 1 and not config.notcp:
            ready.append(target[0].listening)
    listener, *quic = listeners(root.reactor, config.tunnel, "tunnel", root.fail,
                                tunnel.tunnel_factory(), tunnel.quic_listener())
    for service in (listener, *quic):
        service.setServiceParent(root)
    ready.append(listener.listening)
    listener.listening.addCallback(lambda port: tunnel.announce_mode(
        _listening_on(target[0] if target and not config.notcp else None, config.target)))
    return _reported(root, tunnel.report, tunables, ready)


def _reported(root: RootService, report: Callable[[], Report], tunables: Tunables,
              ready: list[Deferred[Any]]) -> Built:
    """The debug report line every REPORT_INTERVAL (at log=debug: otherwise no timer
    wakes the process for it); (report, ready) where ready is True once every listener
    listens, False when one failed (root.fail has said why)."""
    if logs.gate.passes(LogLevel.debug):
        reporter(root.reactor, report, tunables.report_interval).setServiceParent(root)
    listening = gatherResults(ready, consumeErrors=True) if ready else succeed([])
    return report, listening.addCallbacks(lambda _: True, lambda _: False)


def _listening_on(listener: Any, address: Any) -> Any:
    """The address a listener took (its port when 0 was asked), or ``address``."""
    from nodepass.url import Address

    if listener is None or listener.port is None:
        return address
    return Address(address.host, listener.port.getHost().port)


def _client(root: RootService, config: ClientConfig, tunables: Tunables,
            loaded: Credentials | None) -> Built:
    from nodepass.endpoints import dial_endpoint, listeners
    from nodepass.tunnel.client import ClientTunnel
    from nodepass.tunnel.direct import bindable
    from nodepass.tunnel.targets import TargetDialer

    dialer = TargetDialer.for_config(root.reactor, config, tunables)
    # mode=0 turns single-end when the server address is free here — but never for a URL
    # with a key: a keyed client means a tunnel, and single-end forwards anyone, keyless.
    if config.mode == 1 or (config.mode == 0 and config.tunnel_key is None
                            and bindable(config.tunnel)):
        return _single_end(root, config, tunables, dialer)

    def forward_listeners(tunnel: ClientTunnel) -> list[Any]:
        """Forward mode: users connect to this client's target address, TCP and UDP."""
        return listeners(root.reactor, config.target, "target", root.fail,
                         None if config.notcp else tunnel.ingress.user_factory(),
                         None if config.noudp else tunnel.ingress.udp)

    tunnel = ClientTunnel(root.reactor, config, tunables, on_fatal=root.fail,
                          server=dial_endpoint(root.reactor, config.tunnel), dialer=dialer,
                          forward_listeners=forward_listeners)
    tunnel.setServiceParent(root)
    started: Deferred[Any] = Deferred()
    root.reactor.callWhenRunning(started.callback, True)
    return _reported(root, tunnel.report, tunables, [started])


def _single_end(root: RootService, config: ClientConfig, tunables: Tunables,
                dialer: Any) -> Built:
    from nodepass.endpoints import listeners
    from nodepass.tunnel.direct import DirectForwarder

    forwarder = DirectForwarder(root.reactor, config, tunables, dialer)
    forwarder.setServiceParent(root)
    services = listeners(root.reactor, config.tunnel, "single-end", root.fail,
                         None if config.notcp else forwarder.user_factory(),
                         None if config.noudp else forwarder.udp,
                         udp_only_if=lambda: not root.exit_status)
    for service in services:
        service.setServiceParent(root)
    ready = [] if config.notcp else [services[0].listening]
    return _reported(root, forwarder.report, tunables, ready)
