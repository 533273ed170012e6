"""The usage table shown by ``nodepass --help`` and ``twistd nodepass --help``."""

from nodepass import __version__

USAGE = f"""\
nodepass {__version__} - a TCP/UDP tunnel daemon

Usage:
  nodepass URL                 run in the foreground
  python -m nodepass URL       the same
  twistd [-n] nodepass URL     the same service tree under twistd (daemonizes without -n)
  nodepass --help | --version

Modes (the URL's scheme):
  server://[key@]tunnel_host:port/target_host:port?log=info&tls=0
      accept the client's tunnel on tunnel_host:port; carry every TCP connection and
      UDP datagram that arrives at target_host:port through it to the client
  client://[key@]server_host:port/target_host:port?log=info
      dial the server's tunnel; connect what it carries to target_host:port here
  master://api_host:port[/prefix]?log=info&tls=0
      serve the REST API under prefix/v1 (prefix default /api)

URL parts:
  key          tunnel key (userinfo); default: the tunnel port in hex (guessable: set one)
  host         IPv4, [IPv6] or a DNS name; 0.0.0.0 or [::] listens on every interface
  port         1-65535

Query parameters:
  log=debug|info|warn|error|fatal|none   log level (default info)
  tls=0|1|2    server and master: 0 plain, 1 self-signed certificate made at start,
               2 the certificate in crt= and key= (the client adopts the server's mode)
  crt=PATH     PEM certificate (chain allowed), with tls=2
  key=PATH     PEM private key, with tls=2
  sni=NAME     client: the name to verify a tls=2 certificate as (default: the server host)
  ca=PATH      client: PEM file of CAs to trust for tls=2 (default: the system store)
  auth=0|1     master: require the API key (default 1; NODEPASS_API_KEY or generated)
  state=DIR    master: state directory (default NODEPASS_STATE_DIR, ~/.local/state/nodepass)
  persist=0|1  master: keep instances in SQLite across restarts (default 1)

Environment (also accepted with an NP_ prefix; durations like 500ms, 5s, 1h30m):
  SEMAPHORE_LIMIT    1024   concurrent relayed connections
  MIN_POOL_CAPACITY  16     idle pooled connections kept at least
  MAX_POOL_CAPACITY  1024   idle pooled connections kept at most
  MIN_POOL_INTERVAL  1s     shortest interval between pool rounds
  MAX_POOL_INTERVAL  5s     longest interval between pool rounds
  UDP_DATA_BUF_SIZE  8192   largest UDP datagram carried, in bytes
  UDP_READ_TIMEOUT   5s     a UDP session ends after this much silence
  REPORT_INTERVAL    5s     heartbeat and statistics period
  RELOAD_INTERVAL    1h     tls=2 certificate reload period
  SERVICE_COOLDOWN   5s     wait before restarting a failed tunnel
  SHUTDOWN_TIMEOUT   5s     how long live connections may finish at shutdown

Exit status: 0 after a clean stop, 1 when the service fails, 2 for a bad URL or environment.
Documentation: docs/usage.md and docs/configuration.md
"""
