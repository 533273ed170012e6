"""The usage table shown by ``nodepass --help`` and ``twistd nodepass --help``."""

from nodepass import __version__

USAGE = f"""\
nodepass {__version__} - a TCP/UDP tunnel daemon

Usage:
  nodepass URL                 run in the foreground
  python -m nodepass URL       the same
  twistd [-n] nodepass URL     the same service tree under twistd (daemonizes without -n)
  nodepass -                   the URL from standard input (one line), or
  nodepass                     from NODEPASS_URL: either keeps a key out of `ps`
  nodepass --help | --version

Modes (the URL's scheme):
  server://[key@]tunnel_host:port/target_host:port?log=info&tls=0
      accept the client's tunnel on tunnel_host:port; reverse mode: carry every TCP
      connection and UDP datagram that arrives at target_host:port to the client;
      forward mode: the client listens, this server dials target_host:port
  client://[key@]server_host:port/target_host:port?log=info
      dial the server's tunnel; reverse: connect what it carries to target_host:port;
      forward: listen on target_host:port.  Single-end (mode=1): no server, listen on
      server_host:port and forward straight to target_host:port
  master://api_host:port[/prefix]?log=info&tls=0
      serve the REST API under prefix/v1 (prefix default /api)

URL parts:
  key          tunnel key (userinfo); default: the tunnel port in hex (guessable: set one)
  host         IPv4, [IPv6] or a DNS name; 0.0.0.0 or [::] listens on every interface
  port         1-65535
  targets      host:port,host:port,...  several targets to dial: new connections rotate
               across them and skip one that refuses (failover)

Query parameters:
  log=debug|info|warn|error|fatal|none   log level (default info)
  tls=0|1|2    server and master: 0 plain, 1 self-signed certificate made at start,
               2 the certificate in crt= and key=; client: the least mode it accepts
               from the server (default 0: the server's; ca= or sni= mean 2)
  crt=PATH     PEM certificate (chain allowed), with tls=2
  key=PATH     PEM private key, with tls=2
  sni=NAME     client: the name to verify a tls=2 certificate as (default: the server host)
  ca=PATH      client: PEM file of CAs to trust for tls=2 (default: the system store)
  auth=0|1     master: require the API key (default 1; NODEPASS_API_KEY or generated);
               auth=0 only on a loopback address, unless insecure=1 is given too
  insecure=1   master: allow auth=0 on a non-loopback address (anyone who reaches it
               can run programs through the API)
  hosts=NAMES  master: host names it answers to besides its address, like api.example.com
               (the Host is checked with auth=0, or when hosts= is given)
  origins=URLS master: web pages allowed to call the API from another origin, like
               https://panel.example.com (default: any page with auth=1, none with auth=0)
  state=DIR    master: state directory (default NODEPASS_STATE_DIR, ~/.local/state/nodepass)
  persist=0|1  master: keep instances in SQLite across restarts (default 1)
  np=PATH      master: where the NodePass-dialect API lives, under PATH/v1
               (default prefix/np, e.g. /api/np/v1)

Run mode and traffic controls (server and client; defaults left out of the canonical URL):
  mode=0|1|2   server: 1 reverse, 2 forward, 0 reverse if target_host:port can be bound
               here, else forward.  client: 1 single-end, 2 tunnel, 0 single-end if
               server_host:port can be bound here, else tunnel (default 0)
  rate=MBIT    limit each direction to MBIT Mbit/s, TCP and UDP together (0: no limit)
  slot=N       at most N connections + UDP sessions at once (default 65536, 0: no limit;
               SEMAPHORE_LIMIT bounds them too)
  read=DUR     close a connection idle for DUR (0: never); also the UDP session timeout
  proxy=0|1|2  send a PROXY protocol v1/v2 header to the target before the data
  dial=IP      source address for connections to the target (default auto)
  notcp=0|1    carry no TCP on this end        noudp=0|1    carry no UDP on this end
  dns=DUR      keep resolved target names for DUR (default 5m; 0: resolve every time)
  block=DIGITS refuse users whose first bytes are 1 SOCKS, 2 HTTP, 3 TLS (e.g. 13)
  min=N        client: pooled connections kept at least (default MIN_POOL_CAPACITY)
  max=N        server: pooled connections at most, sent to the client, whose own max it
               replaces (default MAX_POOL_CAPACITY)
  type=0       the pool transport: 0 TCP (the only one so far)

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
