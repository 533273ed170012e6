"""The ``nodepass`` command: one URL in, the service tree twistd would run, out."""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from typing import IO

from twisted.python import usage

from nodepass import __version__, logs, tap
from nodepass.helptext import USAGE

EXIT_USAGE = 2


def main(
    argv: Sequence[str] | None = None,
    environ: Mapping[str, str] | None = None,
    stdout: IO[str] | None = None,
    stderr: IO[str] | None = None,
) -> int:
    """Run nodepass; return the process exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    out = sys.stdout if stdout is None else stdout
    err = sys.stderr if stderr is None else stderr
    options = tap.Options(environ)
    if not args and not options.environ.get(tap.URL_ENV, "").strip():
        err.write(USAGE)
        err.write(f"\nnodepass: error: {tap.MISSING_URL}\n")
        return EXIT_USAGE
    if args and args[0] in ("-h", "--help"):
        out.write(USAGE)
        return 0
    if args and args[0] in ("-V", "--version"):
        out.write(f"nodepass {__version__}\n")
        return 0
    if len(args) > 1:
        err.write(f"nodepass: error: expected one URL, got {len(args)} arguments "
                  "(quote the URL in your shell)\n")
        return EXIT_USAGE
    try:
        options.parseOptions(args)
    except usage.UsageError as e:
        err.write(f"nodepass: error: {e}\n")
        return EXIT_USAGE
    return run(options, out)


def run(options: tap.Options, stream: IO[str]) -> int:
    """Start the service tree on the global reactor until SIGTERM/SIGINT or failure."""
    from twisted.internet import reactor

    root = tap.makeService(options)
    logs.start_logging(options["config"].log, stream, root.log_sink)
    reactor.callWhenRunning(root.startService)
    reactor.addSystemEventTrigger("before", "shutdown", root.stopService)
    reactor.run()
    return root.exit_status
