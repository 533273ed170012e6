"""An instance's process: started, stopped and restarted one operation at a time (a
DeferredLock per instance), and every status the API reports is what the process said
or did — never a guess."""

from __future__ import annotations

import signal
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.error import AlreadyCalled

from nodepass import logs
from nodepass.master.host import KILL_GRACE
from nodepass.master.instances import Instance, gone
from nodepass.master.restarts import HEALTHY_FACTOR
from nodepass.master.supervisor import ChildProcess, Spawner, describe_exit
from nodepass.timers import cancelled
from nodepass.tunables import Tunables

READY_TIMEOUT = 5.0
QUARANTINE = 2  # its host lost this often since its last healthy run: a host of its own


class Lifecycle:
    log = logs.logger("nodepass.master")

    def __init__(self, reactor: Any, tunables: Tunables, environ: Mapping[str, str],
                 spawn: Spawner, changed: Callable[[str, Instance], None],
                 save: Callable[[Instance], None],
                 exited_on_its_own: Callable[[Instance], None],
                 logged: Callable[[Instance, str, str, str], None]) -> None:
        self.reactor = reactor
        self.tunables = tunables
        self.environ = environ
        self.spawn = spawn
        self.changed = changed  # an event for subscribers
        self.save = save
        self.exited_on_its_own = exited_on_its_own  # the restart policy hears of it
        self.logged = logged  # one log line of the instance's

    async def start(self, instance: Instance) -> None:
        await instance.lock.run(self._start, instance)

    async def stop(self, instance: Instance) -> None:
        await instance.lock.run(self._stop, instance)

    async def restart(self, instance: Instance) -> None:
        async def both() -> None:
            await self._stop(instance)
            await self._start(instance)
            instance.restarted_at = instance.started_at

        await self.exclusively(instance, both)

    async def exclusively(self, instance: Instance,
                          operation: Callable[[], Awaitable[None]]) -> None:
        """Run ``operation`` when no other is running on ``instance``."""
        await instance.lock.run(lambda: Deferred.fromCoroutine(operation()))

    # -- within an operation (the lock held) ---------------------------------

    def _start(self, instance: Instance) -> Deferred[None]:
        return Deferred.fromCoroutine(self.start_now(instance))

    async def start_now(self, instance: Instance) -> None:
        if instance.deleted:  # deleted while this waited for its turn
            raise gone(instance)
        if instance.child is not None and instance.child.running:
            return
        if instance.desired != "running":
            instance.desired = "running"
            self.save(instance)
        instance.error = instance.last_fatal = None
        instance.report = {}
        instance.stopping = False
        instance.ready, instance.exited = Deferred(), Deferred()
        child = ChildProcess(instance.id, lambda e: self._event(instance, e),
                             lambda code, sig, tail: self._exited(instance, code, sig, tail),
                             lambda level, text, line: self.logged(instance, level, text, line))
        child.alone = instance.host_losses >= QUARANTINE
        instance.child = child
        try:
            self.spawn(self.reactor, instance.url, self.environ, child)
        except OSError as e:
            instance.status, instance.error = "error", f"cannot start: {e}"
            instance.child = None
            self.changed("update", instance)
            return
        instance.started_at = self.reactor.seconds()
        timer = self.reactor.callLater(READY_TIMEOUT, _fire, instance.ready)
        await instance.ready
        cancelled(timer)
        if child.running:
            instance.status = "running"
            self.log.info("instance {id} running", id=instance.id)
        self.changed("update", instance)

    def _stop(self, instance: Instance) -> Deferred[None]:
        return Deferred.fromCoroutine(self.stop_now(instance))

    async def stop_now(self, instance: Instance) -> None:
        """SIGTERM, then SIGKILL after SHUTDOWN_TIMEOUT and a grace; done once it exited."""
        child = instance.child
        if child is None or not child.running:
            instance.status, instance.error = "stopped", None
            return
        instance.stopping = True
        child.signal(signal.SIGTERM)
        grace = self.tunables.shutdown_timeout + KILL_GRACE
        killer = self.reactor.callLater(grace, child.signal, signal.SIGKILL)
        assert instance.exited is not None
        await instance.exited
        cancelled(killer)
        instance.status, instance.error = "stopped", None
        instance.stopped_at = self.reactor.seconds()
        self.log.info("instance {id} stopped", id=instance.id)
        self.changed("update", instance)

    # -- what the process says and does -----------------------------------------

    def _event(self, instance: Instance, event: dict[str, Any]) -> None:
        kind = event.get("type")
        if kind == "ready" and instance.ready is not None:
            _fire(instance.ready)
        elif kind == "report":
            instance.report = {k: v for k, v in event.items() if k != "type"}
        elif kind == "fatal":
            message = event.get("message")
            instance.last_fatal = str(message)[:500] if message is not None else None

    def _exited(self, instance: Instance, code: int | None, sig: int | None,
                stderr_tail: list[str]) -> None:
        instance.base = instance.counters()  # what this process counted is kept
        instance.report = {}
        instance.host_lost = instance.child is not None and instance.child.host_lost
        if instance.host_lost:
            instance.host_losses += 1
        elif self._ran_healthy(instance):  # (only then is it trusted among others again)
            instance.host_losses = 0
        instance.child = None
        if not instance.stopping:
            reason = instance.last_fatal or (stderr_tail[-1] if stderr_tail else None)
            instance.status = "error"
            instance.error = describe_exit(code, sig) + (f": {reason}" if reason else "")
            instance.stopped_at = self.reactor.seconds()
            self.log.error("instance {id} {error}", id=instance.id, error=instance.error)
            self.exited_on_its_own(instance)
            self.changed("update", instance)
        if instance.ready is not None:
            _fire(instance.ready)
        if instance.exited is not None:
            _fire(instance.exited)

    def _ran_healthy(self, instance: Instance) -> bool:
        ran = self.reactor.seconds() - (instance.started_at or self.reactor.seconds())
        return ran >= HEALTHY_FACTOR * self.tunables.service_cooldown


def _fire(d: Deferred[None]) -> None:
    if not d.called:
        try:
            d.callback(None)
        except AlreadyCalled:
            pass
