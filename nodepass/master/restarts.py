"""``restart=true``: an instance whose process exits on its own is started again after
SERVICE_COOLDOWN, the delay doubling while it keeps failing (capped at 12 cooldowns);
a run of 10 cooldowns counts as healthy and starts the delays over."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from nodepass import logs
from nodepass.backoff import backoff
from nodepass.master.instances import Instance
from nodepass.timers import cancelled

HEALTHY_FACTOR = 10


class RestartPolicy:
    log = logs.logger("nodepass.master")

    def __init__(self, reactor: Any, cooldown: float, restart: Callable[[Instance], None],
                 still_wanted: Callable[[Instance], bool]) -> None:
        self.reactor = reactor
        self.cooldown = cooldown
        self.delay = backoff(cooldown)
        self.restart = restart  # start it again (the restart is counted there)
        self.still_wanted = still_wanted  # not deleted, not stopped meanwhile

    def exited(self, instance: Instance) -> None:
        """Its process exited on its own: try again later, if it is meant to run (and
        always when its host ended under it: that may have been another's doing)."""
        if instance.desired != "running" or not (instance.auto_restart or instance.host_lost):
            return
        ran = self.reactor.seconds() - (instance.started_at or self.reactor.seconds())
        if ran >= HEALTHY_FACTOR * self.cooldown:
            instance.failures = 0
        instance.failures += 1
        delay = self.delay(instance.failures)
        self.log.warn("instance {id} will be restarted in {delay:g}s (attempt {n})",
                      id=instance.id, delay=round(delay, 3), n=instance.failures)
        instance.restart_call = self.reactor.callLater(delay, self._again, instance)

    def cancel(self, instance: Instance) -> None:
        instance.restart_call = cancelled(instance.restart_call)

    def _again(self, instance: Instance) -> None:
        instance.restart_call = None
        if self.still_wanted(instance):
            self.restart(instance)
