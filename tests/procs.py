"""Running nodepass and twistd as users do: in subprocesses, with bounded waits."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TIMEOUT = 30


def clean_env(**extra: str) -> dict[str, str]:
    """The environment without nodepass tunables, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NP_", "NODEPASS_"))}
    env["PYTHONPATH"] = str(REPO)
    env.update(extra)
    return env


def run_nodepass(*args: str, env: dict[str, str] | None = None,
                 stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "nodepass", *args], capture_output=True, text=True,
        env=clean_env() if env is None else env, timeout=TIMEOUT, cwd=REPO, input=stdin,
    )


def installed_script(name: str) -> str | None:
    """A console script installed beside this Python, else one on PATH."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    return shutil.which(name)
