"""The master's service tree: the API listener and the registry of instances."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.web.server import Site

from nodepass import logs
from nodepass.endpoints import ListenerService
from nodepass.master.api import MasterAPI
from nodepass.master.instances import Registry
from nodepass.master.state import StateError, api_key, ensure_dir, state_dir
from nodepass.root import RootService
from nodepass.tls import ServerCredentials, fingerprint_text
from nodepass.tunables import Tunables
from nodepass.url import MasterConfig

log = logs.logger("nodepass.master")


class RegistryService(Service):
    """Stops every instance when the master stops: no orphan process is left behind."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return Deferred.fromCoroutine(self.registry.shutdown())


class _QuietSite(Site):
    noisy = False

    def log(self, request: Any) -> None:
        log.debug("{method} {path} {code}", method=request.method.decode(),
                  path=request.uri.decode("utf-8", "replace"), code=request.code)


def build_master(root: RootService, config: MasterConfig, tunables: Tunables,
                 credentials: ServerCredentials | None, environ: Mapping[str, str]) -> None:
    key = None
    if config.auth:
        try:
            folder = ensure_dir(state_dir(config, environ))
            key, origin = api_key(folder, environ)
        except StateError as e:
            root.reactor.callWhenRunning(root.fail, str(e))
            return
        if origin == "new":
            log.warn("API key generated and saved in {path}: {key}",
                     path=str(folder / "api.key"), key=key)
        else:
            log.info("API key from {origin}", origin="NODEPASS_API_KEY" if origin == "env"
                     else str(folder / "api.key"))
    else:
        log.warn("auth=0: the API accepts requests without a key; put an authenticating "
                 "proxy in front of it")
    registry = Registry(root.reactor, config, tunables, environ)
    RegistryService(registry).setServiceParent(root)
    api = MasterAPI(registry, config.prefix, key)
    site = _QuietSite(api.resource())
    scheme = "https" if credentials is not None else "http"
    if credentials is not None:
        log.info("tls={mode}: API certificate fingerprint {fp}", mode=config.tls,
                 fp=fingerprint_text(credentials.credentials.fingerprint))
    listener = ListenerService(root.reactor, config.api, site, "API", root.fail, credentials)
    listener.setServiceParent(root)
    listener.listening.addCallback(lambda port: log.info(
        "master API at {scheme}://{address}{prefix}/v1/", scheme=scheme,
        address=str(config.api), prefix=config.prefix))
    listener.listening.addErrback(lambda _: None)
