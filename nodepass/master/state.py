"""Where the master keeps its state, and its API key.

The state directory is ``state=DIR`` in the master URL, else ``NODEPASS_STATE_DIR``,
else ``$XDG_STATE_HOME/nodepass``, else ``~/.local/state/nodepass``.  It holds secrets
(the key; instance URLs with their tunnel keys in the database), so it is kept for this
user alone: the directory 0700, its files 0600 -- made so when this user owns them,
refused when another does.
"""

from __future__ import annotations

import hmac
import os
import secrets
import stat
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from nodepass.master.store import DB_FILE
from nodepass.url import MasterConfig

KEY_FILE = "api.key"
DATABASE_ENV = "NODEPASS_DATABASE_URL"
NODE_FILE = "node.id"  # a fleet master's node id (pgstore.py)
# The database and every file SQLite may keep beside it.
DB_FILES = (DB_FILE, *(DB_FILE + extra for extra in ("-wal", "-shm", "-journal")))


class StateError(Exception):
    """The state directory or a file in it cannot be used; one line for the user."""


def database_url(config: MasterConfig, environ: Mapping[str, str]) -> str | None:
    """The fleet's PostgreSQL database: ``state=postgresql://...``, else
    NODEPASS_DATABASE_URL; None for the embedded SQLite store."""
    if config.state and is_database_url(config.state):
        return config.state
    return environ.get(DATABASE_ENV) or None


def is_database_url(text: str) -> bool:
    return text.startswith(("postgresql://", "postgres://"))


def state_dir(config: MasterConfig, environ: Mapping[str, str]) -> Path:
    """The state directory (with a fleet database, it keeps the key and the node id)."""
    if config.state and not is_database_url(config.state):
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
    from nodepass.master.store import Store, StoreError

    folder = state_dir(config, environ)
    database = database_url(config, environ)
    if database and not config.persist:
        raise StoreError("persist=0 keeps instances in memory; it cannot be combined with a "
                         "fleet database (state=postgresql://... or NODEPASS_DATABASE_URL)")
    if config.auth or config.persist:
        ensure_dir(folder)
        exposed(folder)  # one that cannot be made private stops the start here
    if config.auth and not environ.get("NODEPASS_API_KEY"):
        path = folder / KEY_FILE
        try:
            path.read_text()
        except FileNotFoundError:
            pass  # made at start, and said in the log
        except OSError as e:
            raise StateError(f"API key file {str(path)!r} cannot be read ({e.strerror})") \
                from None
    if database:
        open_store(config, environ, folder).close()
    elif config.persist:
        Store.open(folder).close()


def open_store(config: MasterConfig, environ: Mapping[str, str], folder: Path) -> Any:
    """The store the master keeps its instances in: PostgreSQL (pgstore.py) when a
    fleet database is given, else SQLite in ``folder`` (in memory with persist=0)."""
    from nodepass.master.store import Store

    database = database_url(config, environ)
    if database:
        from nodepass.master.pgstore import PgStore

        return PgStore(database, folder)
    return Store.open(folder if config.persist else None)


def ensure_dir(path: Path) -> Path:
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as e:
        raise StateError(f"state directory {str(path)!r} cannot be created ({e.strerror})") \
            from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise StateError(f"state directory {str(path)!r} is not writable")
    return path


def exposed(folder: Path) -> list[tuple[Path, int, int]]:
    """The state directory and those of its files that others may read, as (path, mode,
    the mode it should have); raises StateError for one this user does not own (so
    cannot make private)."""
    found = []
    for path, private in ((folder, 0o700), *((folder / name, 0o600)
                                             for name in (KEY_FILE, NODE_FILE, *DB_FILES))):
        try:
            info = path.stat()
        except FileNotFoundError:
            continue
        except OSError as e:
            raise StateError(f"state file {str(path)!r} cannot be examined ({e.strerror})") \
                from None
        mode = stat.S_IMODE(info.st_mode)
        if not mode & 0o077:
            continue
        if info.st_uid != os.geteuid():
            what = "state directory" if path == folder else "state file"
            raise StateError(
                f"{what} {str(path)!r} can be read by other users (mode {mode:04o}) and "
                f"belongs to uid {info.st_uid}, not to this user (uid {os.geteuid()}), so "
                f"nodepass cannot make it private: run chmod {private:o} {str(path)!r} as its "
                "owner, or choose another state directory (state= or NODEPASS_STATE_DIR)")
        found.append((path, mode, private))
    return found


def make_private(folder: Path) -> list[tuple[Path, int, int]]:
    """Take group and other permissions away from the state directory and its files
    (all owned by this user, or StateError); -> what was changed, for the log."""
    changed = exposed(folder)
    for path, _, private in changed:
        try:
            path.chmod(private)
        except OSError as e:
            raise StateError(f"{str(path)!r} cannot be made private ({e.strerror})") from None
    return changed


def api_key(folder: Path, environ: Mapping[str, str]) -> tuple[str, str]:
    """-> (key, where it came from: "env", "file" or "new")."""
    if environ.get("NODEPASS_API_KEY"):
        return environ["NODEPASS_API_KEY"], "env"
    key, made = kept_value(folder / KEY_FILE, "API key file", new_key)
    return key, "new" if made else "file"


def kept_value(path: Path, what: str, make: Callable[[], str]) -> tuple[str, bool]:
    """The value kept in ``path``, or a new one from ``make()`` written there first (0600)
    -> (value, whether it was made now)."""
    try:
        existing = path.read_text().strip()
    except FileNotFoundError:
        existing = ""
    except OSError as e:
        raise StateError(f"{what} {str(path)!r} cannot be read ({e.strerror})") from None
    if existing:
        return existing, False
    value = make()
    _write_key(path, value, what)
    return value, True


def new_key() -> str:
    return secrets.token_urlsafe(32)


def _write_key(path: Path, key: str, what: str = "API key file") -> None:
    """Replace the key file at once (mode 0600 from the start: never world-readable)."""
    partial = path.with_name(path.name + ".new")
    try:
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(key + "\n")
        os.replace(partial, path)
    except OSError as e:
        raise StateError(f"{what} {str(path)!r} cannot be written ({e.strerror})") from None


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
