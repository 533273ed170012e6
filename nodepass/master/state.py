"""Where the master keeps its state, and its API key.

The state directory is ``state=DIR`` in the master URL, else ``NODEPASS_STATE_DIR``,
else ``$XDG_STATE_HOME/nodepass``, else ``~/.local/state/nodepass``.
"""

from __future__ import annotations

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
    key = secrets.token_urlsafe(32)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(key + "\n")
    except OSError as e:
        raise StateError(f"API key file {str(path)!r} cannot be written ({e.strerror})") \
            from None
    return key, "new"
