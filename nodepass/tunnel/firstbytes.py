"""``block=``: refusing users by the first bytes they send, as NodePass does.

Each digit of ``block`` names a kind of traffic: ``1`` SOCKS (version 4 with
command 1 or 2, or version 5 with a method count), ``2`` HTTP (an upper-case
method word, then a space, within the first 8 bytes), ``3`` TLS (a handshake
record: 0x16 0x03).  Each kind is told within :data:`HEAD_LIMIT` bytes, so a
user's bytes are held at most that long; a user who sends fewer and waits (or
half-closes) is let through with what was held.  Server-first protocols are not
delayed: nothing is held until the user sends.
"""

from __future__ import annotations

from collections.abc import Callable

from nodepass.url import BLOCKABLE

HEAD_LIMIT = 8


def _socks(head: bytes) -> bool | None:
    if head[0] not in (4, 5):
        return False
    if len(head) < 2:
        return None
    return head[1] in (1, 2) if head[0] == 4 else head[1] >= 1


def _http(head: bytes) -> bool | None:
    for i, byte in enumerate(head[:HEAD_LIMIT]):
        if byte == 0x20:
            return i > 0
        if not 0x41 <= byte <= 0x5A:
            return False
    return False if len(head) >= HEAD_LIMIT else None


def _tls(head: bytes) -> bool | None:
    if head[0] != 0x16:
        return False
    return None if len(head) < 2 else head[1] == 0x03


_TESTS: dict[str, Callable[[bytes], bool | None]] = {"1": _socks, "2": _http, "3": _tls}
assert set(_TESTS) == set(BLOCKABLE)


def judge(head: bytes, block: str) -> str | bool | None:
    """The kind ``head`` shows that ``block`` refuses (``"SOCKS"``...), ``None`` when it
    is allowed, ``True`` when more bytes are needed to tell."""
    if not head:
        return True
    undecided = False
    for digit in block:
        found = _TESTS[digit](head)
        if found:
            return BLOCKABLE[digit]
        undecided = undecided or found is None
    return True if undecided and len(head) < HEAD_LIMIT else None


class FirstBytes:
    """A user's first bytes, held until ``block`` can judge them."""

    def __init__(self, block: str) -> None:
        self.block = block
        self.head = b""
        self.decided = False

    def feed(self, data: bytes) -> tuple[str | None, bytes]:
        """-> (the refused kind or None, the bytes that may pass now)."""
        head = self.head + data
        verdict = judge(head, self.block)
        if verdict is True:
            self.head = head
            return None, b""
        self.decided, self.head = True, b""
        if verdict is None:
            return None, head
        return str(verdict), b""

    def release(self) -> bytes:
        """The user half-closed before a verdict: what was held passes."""
        self.decided, held, self.head = True, self.head, b""
        return held
