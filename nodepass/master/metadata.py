"""What panels may attach to an instance, checked the same way in both API dialects.

Each check returns the value to store or raises :class:`MetadataError` with one line
naming the field and what is allowed.
"""

from __future__ import annotations

import uuid
from typing import Any

from nodepass.master.instances import PEER_FIELDS

MAX_TEXT = 256  # NodePass's limit for an alias, a tag, a peer field
MAX_TAGS = 64
PEER_TYPES = ("", "0", "1", "2")  # NodePass: 0 single-end, 1 NAT traversal, 2 tunnel


class MetadataError(ValueError):
    """A metadata value the master refuses; ``str()`` is one line for the user."""


def alias(value: Any, field: str = "alias") -> str:
    if not isinstance(value, str) or len(value) > MAX_TEXT:
        raise MetadataError(f"'{field}' must be a string of at most {MAX_TEXT} characters")
    return _no_nul(value, field)


def _no_nul(value: str, field: str) -> str:
    """No NUL character: neither SQL text type (PostgreSQL's) nor many panels hold one."""
    if "\x00" in value:
        raise MetadataError(f"'{field}' must not contain a NUL character")
    return value


def tags(value: Any) -> dict[str, str]:
    if not (isinstance(value, dict) and len(value) <= MAX_TAGS
            and all(isinstance(k, str) and isinstance(v, str) and 0 < len(k) <= MAX_TEXT
                    and len(v) <= MAX_TEXT and ":" not in k for k, v in value.items())):
        raise MetadataError(f"'tags' must be an object of at most {MAX_TAGS} string values, "
                            f"keys of 1-{MAX_TEXT} characters without ':', values of at most "
                            f"{MAX_TEXT}")
    for key, text in value.items():
        _no_nul(key, "tags")
        _no_nul(text, "tags")
    return dict(value)


def restart(value: Any) -> bool:
    if not isinstance(value, bool):
        raise MetadataError("'restart' must be true or false")
    return value


def peer(value: Any) -> dict[str, str]:
    """The fields of NodePass's ``meta.peer`` that are given (the others keep theirs):
    ``sid`` a UUID, ``type`` "0", "1" or "2", ``alias`` a string; "" clears one."""
    if not isinstance(value, dict):
        raise MetadataError("'peer' must be an object with sid, type and alias")
    unknown = sorted(set(value) - set(PEER_FIELDS))
    if unknown:
        raise MetadataError(f"unknown peer field {unknown[0]!r} (allowed: sid, type, alias)")
    if not all(isinstance(v, str) for v in value.values()):
        raise MetadataError("peer fields must be strings")
    sid = value.get("sid")
    if sid:
        try:
            value = {**value, "sid": str(uuid.UUID(sid))}
        except ValueError:
            raise MetadataError(f"peer 'sid' must be a UUID, like "
                                f"1b4e28ba-2fa1-11d2-883f-0016d3cca427 (not {sid[:40]!r})") \
                from None
    if value.get("type", "") not in PEER_TYPES:
        raise MetadataError("peer 'type' must be \"0\" (single-end), \"1\" (NAT traversal) or "
                            "\"2\" (tunnel forwarding)")
    if len(value.get("alias", "")) > MAX_TEXT:
        raise MetadataError(f"peer 'alias' must be at most {MAX_TEXT} characters")
    _no_nul(value.get("alias", ""), "peer alias")
    return dict(value)
