"""The master's service tree: the API listener and the registry of instances."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from klein import Klein
from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater

from nodepass import logs
from nodepass.master import sysinfo
from nodepass.master.api import MasterAPI
from nodepass.master.dashboard import Dashboard
from nodepass.master.gate import Gate
from nodepass.master.npapi import NodePassAPI
from nodepass.master.pg import SCHEMA_VERSION as PG_SCHEMA_VERSION
from nodepass.master.registry import Registry
from nodepass.master.site import ApiSite, DeadlineChannel
from nodepass.master.state import (
    KEY_FILE,
    ApiKey,
    api_key,
    ensure_dir,
    make_private,
    open_store,
    state_dir,
)
from nodepass.master.store import SCHEMA_VERSION
from nodepass.master.tcping import TcpPing
from nodepass.master.web import KeyCheck, mount
from nodepass.tls import ServerCredentials
from nodepass.url import Address, MasterConfig

log = logs.logger("nodepass.master")
FLUSH_GRACE = 0.2
STORE_GRACE = 5.0  # seconds the last writes get to reach a fleet database at stop
__all__ = [
    "ApiSite",
    "DeadlineChannel",
    "RegistryService",
    "announce",
    "api_app",
    "api_site",
    "open_state",
]


class RegistryService(Service):
    """Brings stored instances back at start; stops every instance when the master
    stops, so no orphan process is left behind."""

    def __init__(self, registry: Registry, hosts: Any = None) -> None:
        self.registry = registry
        self.hosts = hosts  # started first, stopped after the last instance

    def startService(self) -> None:
        super().startService()
        if self.hosts is not None:
            self.hosts.start()
        self.registry.hub.start()
        if self.registry.fleet is not None:
            self.registry.fleet.start()
        self.registry.restore()

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        if self.registry.fleet is not None:
            self.registry.fleet.stop()  # no command taken now would be stopped below
        await self.registry.shutdown()
        if self.hosts is not None:
            self.hosts.stop()
        if self.registry.fleet is not None:
            await self.registry.store.close_async(STORE_GRACE)
        hub = self.registry.hub
        hub.publish("shutdown")
        hub.stop()
        if hub.subscribers:
            hub.close_all()
            # let the last event reach the subscribers before the reactor drops every
            # connection (its shutdown does not flush)
            await deferLater(self.registry.reactor, FLUSH_GRACE, lambda: None)
        self.registry.store.close()


@dataclass(frozen=True)
class ApiApp:
    """Both dialects of the API on one Klein app, over one registry and one key."""

    app: Klein
    seed: MasterAPI
    nodepass: NodePassAPI
    gate: Gate


def api_app(registry: Registry, config: MasterConfig, key: ApiKey, folder: str) -> ApiApp:
    keys = KeyCheck(key, registry.reactor)
    seed = MasterAPI(registry, config.prefix, keys, folder, f"{config.np_prefix}/v1")
    nodepass = NodePassAPI(registry, config.np_prefix, keys, TcpPing(registry.reactor))
    dashboard = Dashboard(config.prefix, auth=bool(config.auth))
    sysinfo.prime()
    return ApiApp(mount(seed, nodepass, dashboard), seed, nodepass,
                  Gate(config, keys, seed, nodepass, public=tuple(dashboard.public_paths())))


def to_terminal(text: str, fd: int = 2) -> bool:
    """Show ``text`` on the terminal the master was started from, if standard error is
    one: never through the logger, whose lines may end in a file others can read
    (``twistd --logfile``), a journal or a pipe."""
    if not os.isatty(fd):
        return False
    os.write(fd, text.encode())
    return True


def open_state(config: MasterConfig, environ: Mapping[str, str],
               terminal: Callable[[str], object] = to_terminal
               ) -> tuple[Any, ApiKey, Path]:
    """The master's state directory (made private), key and database, each said in the
    log -- a generated key only on ``terminal``, never in the log."""
    folder = state_dir(config, environ)
    key, origin = None, "none"
    if config.auth or config.persist:
        ensure_dir(folder)
        for path, mode, private in make_private(folder):
            log.warn("{path} could be read by other users (mode {mode}): made it {private}",
                     path=str(path), mode=f"{mode:04o}", private=f"{private:04o}")
    if config.auth:
        key, origin = api_key(folder, environ)
    store = open_store(config, environ, folder)
    if store.kind == "postgresql":
        log.info("state in the fleet database {where} (schema version {v}), node {node}",
                 where=store.where, v=PG_SCHEMA_VERSION, node=store.node)
    elif config.persist:
        log.info("state in {path} (schema version {v})", path=str(store.path), v=SCHEMA_VERSION)
    else:
        log.warn("persist=0: instances live in memory and are forgotten when the master stops")
    if not config.auth:
        log.warn("auth=0: the API accepts requests without a key; put an authenticating "
                 "proxy in front of it")
    elif origin == "new":
        path = str(folder / KEY_FILE)
        log.warn("API key generated and saved in {path} (readable by this user only; the "
                 "key itself is never logged)", path=path)
        terminal(f"nodepass: API key generated and saved in {path}: {key}\n")
    else:
        log.info("API key from {origin}", origin="NODEPASS_API_KEY" if origin == "env"
                 else str(folder / KEY_FILE))
    return store, ApiKey(key, origin, folder / KEY_FILE), folder


def api_site(reactor: Any, registry: Registry, config: MasterConfig, key: ApiKey,
             folder: Path) -> ApiSite:
    built = api_app(registry, config, key, str(folder))
    return ApiSite(built.app.resource(), built.gate, timeout=60, reactor=reactor)


def announce(config: MasterConfig, credentials: ServerCredentials | None, port: Any) -> None:
    scheme = "https" if credentials is not None else "http"
    log.info("master API at {scheme}://{address}{prefix}/v1/ (NodePass dialect at "
             "{scheme}://{address}{np}/v1/)", scheme=scheme,
             address=str(Address(config.api.host, port.getHost().port)), prefix=config.prefix,
             np=config.np_prefix)
