"""Where the master keeps its state, and its API key.

The state directory is ``state=DIR`` in the master URL, else ``NODEPASS_STATE_DIR``,
else ``$XDG_STATE_HOME/nodepass``, else ``~/.local/state/nodepass``.
"""

from __future__ import annotations

import hmac
import os
import secrets
from collections.abc import Mapping
from pathlib import Path

from nodepass.url import MasterConfig

KEY_FILE = "api.key"


class StateError(Exception):
    """The state directory or a file in it cannot be used; one line for the user."""


def state_dir(config: MasterConfig, environ: Mapping[str, str]) -> Path:
    if config.state:
        return Path(config.state)
    if environ.get("NODEPASS_STATE_DIR"):
        return Path(environ["NODEPASS_STATE_DIR"])
    base = environ.get("XDG_STATE_HOME") or os.path.join(
        environ.get("HOME") or os.path.expanduser("~"), ".local", "state")
    return Path(base) / "nodepass"


def check_state(config: MasterConfig, environ: Mapping[str, str]) -> None:
    """What the master will need of its state directory, checked before anything starts:
    the directory usable, the key file readable, the database one this nodepass can use
    (raises StateError or StoreError, with one line for the user)."""
    from nodepass.master.store import Store

    folder = state_dir(config, environ)
    if config.auth or config.persist:
        ensure_dir(folder)
    if config.auth and not environ.get("NODEPASS_API_KEY"):
        path = folder / KEY_FILE
        try:
            path.read_text()
        except FileNotFoundError:
            pass  # made at start, and said in the log
        except OSError as e:
            raise StateError(f"API key file {str(path)!r} cannot be read ({e.strerror})") \
                from None
    if config.persist:
        Store.open(folder).close()


def ensure_dir(path: Path) -> Path:
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as e:
        raise StateError(f"state directory {str(path)!r} cannot be created ({e.strerror})") \
            from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise StateError(f"state directory {str(path)!r} is not writable")
    return path


def api_key(folder: Path, environ: Mapping[str, str]) -> tuple[str, str]:
    """-> (key, where it came from: "env", "file" or "new")."""
    if environ.get("NODEPASS_API_KEY"):
        return environ["NODEPASS_API_KEY"], "env"
    path = folder / KEY_FILE
    try:
        existing = path.read_text().strip()
    except FileNotFoundError:
        existing = ""
    except OSError as e:
        raise StateError(f"API key file {str(path)!r} cannot be read ({e.strerror})") from None
    if existing:
        return existing, "file"
    key = new_key()
    _write_key(path, key)
    return key, "new"


def new_key() -> str:
    return secrets.token_urlsafe(32)


def _write_key(path: Path, key: str) -> None:
    """Replace the key file at once (mode 0600 from the start: never world-readable)."""
    partial = path.with_name(path.name + ".new")
    try:
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(key + "\n")
        os.replace(partial, path)
    except OSError as e:
        raise StateError(f"API key file {str(path)!r} cannot be written ({e.strerror})") \
            from None


class ApiKey:
    """The key every API request must carry (``auth=1``), compared in constant time.

    ``rotate`` makes a new one and saves it where the old one was kept; a key given in
    NODEPASS_API_KEY cannot be rotated here (the next start would bring it back).
    """

    def __init__(self, value: str | None, origin: str = "none",
                 path: Path | None = None) -> None:
        self.value = value
        self.origin = origin  # "env", "file", "new", or "none" when auth=0
        self.path = path

    @property
    def required(self) -> bool:
        return self.value is not None

    def matches(self, offered: bytes | None) -> bool:
        if self.value is None:
            return True
        return offered is not None and hmac.compare_digest(offered, self.value.encode())

    def rotate(self) -> str:
        if self.value is None:
            raise StateError("auth=0: the API has no key to rotate")
        if self.origin == "env" or self.path is None:
            raise StateError("the API key is set by NODEPASS_API_KEY; change it there and "
                             "restart the master")
        key = new_key()
        _write_key(self.path, key)
        self.value, self.origin = key, "file"
        return key
