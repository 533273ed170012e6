"""The root of every nodepass service tree, and how a fatal error ends the process."""

from __future__ import annotations

import resource
from collections.abc import Callable
from typing import Any

from twisted.application.service import MultiService

from nodepass import __version__, logs


def raise_open_file_limit() -> tuple[int, int]:
    """Two sockets per relayed connection (and more at the server): lift the soft limit on
    open files to the hard one, as daemons do.  Returns (soft, hard) now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft, hard


class RootService(MultiService):
    """A MultiService that can end the process with a non-zero status.

    A child that meets an error it cannot recover from (its port is taken, its
    certificate is bad) calls :meth:`fail`: the message is logged once at fatal
    level, the exit status becomes 1, and the reactor stops, which stops every
    service gracefully.
    """

    log = logs.logger("nodepass")

    def __init__(self, reactor: Any) -> None:
        super().__init__()
        self.reactor = reactor
        self.exit_status = 0
        self.on_fail: list[Callable[[str], None]] = []
        self.log_sink: Callable[[dict[str, Any]], None] | None = None  # see statuschannel

    def startService(self) -> None:
        self.log.info("nodepass {version} starting", version=__version__)
        super().startService()

    def stopService(self) -> Any:
        self.log.info("stopping")
        stopped = super().stopService()
        return stopped.addCallback(lambda _: self.log.info("stopped"))

    def fail(self, message: str) -> None:
        if self.exit_status:
            return
        self.exit_status = 1
        self.log.critical("{text}", text=message)
        for hook in self.on_fail:
            hook(message)
        self.stop()

    def stop(self) -> None:
        if self.reactor.running:
            self.reactor.stop()
