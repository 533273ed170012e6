"""twistd's entry: the Options and the one makeService that assembles a service tree.

``nodepass URL``, ``python -m nodepass URL`` and ``twistd -n nodepass URL`` all
come through here.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

from twisted.internet.defer import Deferred, gatherResults
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


class Options(usage.Options):
    synopsis = "URL"
    longdesc = USAGE

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        super().__init__()
        self.environ = os.environ if environ is None else environ

    def getUsage(self, width: int | None = None) -> str:
        return USAGE

    def parseArgs(self, *urls: str) -> None:
        if not urls:
            raise usage.UsageError("missing URL (server://, client:// or master://)")
        if len(urls) > 1:
            raise usage.UsageError(f"expected one URL, got {len(urls)} arguments")
        url = urls[0]
        try:
            self["config"] = parse(url)
        except URLError as e:
            raise usage.UsageError(str(e)) from None
        try:
            self["tunables"] = from_environ(self.environ)
        except TunableError as e:
            raise usage.UsageError(f"environment: {e}") from None
        try:
            self["credentials"] = _tls_at_start(self["config"])
        except TLSConfigError as e:
            raise usage.UsageError(str(e)) from None
        _check_dial(self["config"])

    def postOptions(self) -> None:
        scheme = self["config"].scheme
        if scheme not in BUILT_MODES:
            raise usage.UsageError(f"{scheme} mode is not built yet in this version")


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
            tls.verifying_options("localhost", config.ca)
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


def makeService(options: Options, reactor: Any = None) -> RootService:
    """The service tree for the URL in ``options``, on ``reactor`` (the global one
    unless another is handed in: tests run whole trees on a network in memory)."""
    if reactor is None:
        from twisted.internet import reactor
    config = options["config"]
    logs.gate.set_level(config.log)
    raise_open_file_limit()
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
    from nodepass.master.service import build_master

    credentials = server_credentials(root, config, loaded, tunables)
    build_master(root, config, tunables, credentials, environ)


Built = tuple[Callable[[], Report], Deferred[Any]]


def _server(root: RootService, config: ServerConfig, tunables: Tunables,
            loaded: Credentials | None) -> Built:
    from nodepass.endpoints import ListenerService, UdpListenerService
    from nodepass.tunnel.server import REVERSE, ServerTunnel

    credentials = server_credentials(root, config, loaded, tunables)
    tunnel = ServerTunnel(root.reactor, config, tunables, credentials)
    tunnel.setServiceParent(root)
    ready = []
    target_listener = None
    if config.mode != 2 and not config.more_targets:
        # The target listeners start first, and listening on TCP (or UDP) answers at
        # once, so with mode=0 the mode is settled before the tunnel takes a client.
        settle = root.fail if config.mode == 1 else tunnel.cannot_bind_target
        reverse = lambda: tunnel.mode == REVERSE and not root.exit_status  # noqa: E731
        if not config.notcp:
            target_listener = ListenerService(root.reactor, config.target,
                                              tunnel.target_factory(), "target", settle)
            target_listener.setServiceParent(root)
            if config.mode == 1:
                ready.append(target_listener.listening)
            settle = root.fail
        if not config.noudp:
            UdpListenerService(root.reactor, config.target, tunnel.udp, "target", settle,
                               only_if=reverse,
                               same_port_as=target_listener).setServiceParent(root)
    listener = ListenerService(root.reactor, config.tunnel, tunnel.tunnel_factory(), "tunnel",
                               root.fail)
    listener.setServiceParent(root)
    ready.append(listener.listening)
    listener.listening.addCallback(lambda port: tunnel.announce_mode(
        _listening_on(target_listener, config.target)))
    reporter(root.reactor, tunnel.report, tunables.report_interval).setServiceParent(root)
    # True once every listener listens; False when one failed (root.fail reported it).
    listening = gatherResults(ready, consumeErrors=True)
    return tunnel.report, listening.addCallbacks(lambda _: True, lambda _: False)


def _listening_on(listener: Any, address: Any) -> Any:
    """The address a listener took (its port when 0 was asked), or ``address``."""
    from nodepass.url import Address

    if listener is None or listener.port is None:
        return address
    return Address(address.host, listener.port.getHost().port)


def _client(root: RootService, config: ClientConfig, tunables: Tunables,
            loaded: Credentials | None) -> Built:
    from nodepass.tunnel.client import ClientTunnel
    from nodepass.tunnel.direct import bindable, single_end

    if config.mode == 1 or (config.mode == 0 and bindable(config.tunnel)):
        return single_end(root, config, tunables)
    tunnel = ClientTunnel(root.reactor, config, tunables, on_fatal=root.fail)
    tunnel.setServiceParent(root)
    reporter(root.reactor, tunnel.report, tunables.report_interval).setServiceParent(root)
    started: Deferred[Any] = Deferred()
    root.reactor.callWhenRunning(started.callback, True)
    return tunnel.report, started
