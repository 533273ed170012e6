"""``GET /tcping``: can the master's host open a TCP connection to host:port, and how fast.

One target per call, a bounded time (``TIMEOUT``, the name lookup included), at most
``LIMIT`` tests at once; the connection is closed as soon as it is made.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import TimeoutError as DeferredTimeout
from twisted.internet.error import ConnectingCancelledError
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure

from nodepass.endpoints import describe_failure, dial_endpoint
from nodepass.url import Address

TIMEOUT = 5.0
LIMIT = 10


class TooManyPingsError(Exception):
    pass


class TcpPing:
    def __init__(self, reactor: Any, timeout: float = TIMEOUT, limit: int = LIMIT) -> None:
        self.reactor = reactor
        self.timeout = timeout
        self.limit = limit
        self.running = 0

    async def ping(self, target: Address) -> dict[str, Any]:
        """``{"connected", "latency" (ms, int), "error" (None or one line)}``."""
        if self.running >= self.limit:
            raise TooManyPingsError(f"too many tcping tests at once (at most {self.limit}); "
                               "try again in a moment")
        self.running += 1
        started = self.reactor.seconds()
        attempt = dial_endpoint(self.reactor, target, timeout=self.timeout).connect(
            Factory.forProtocol(Protocol))
        attempt.addTimeout(self.timeout, self.reactor)
        try:
            protocol = await attempt
        except (DeferredTimeout, ConnectingCancelledError):  # addTimeout cancelled it
            error: str | None = f"no connection within {self.timeout:g}s"
        except Exception as e:
            error = describe_failure(Failure(e))
        else:
            error = None
            protocol.transport.abortConnection()
        finally:
            self.running -= 1
        latency = round((self.reactor.seconds() - started) * 1000)
        return {"connected": error is None, "latency": latency, "error": error}
