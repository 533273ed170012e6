"""The nodepass URL grammar: text <-> frozen config objects.

One parser serves the CLI, twistd and the REST API::

    server://[key@]tunnel_host:port/target_host:port?log=info&tls=0
    client://[key@]server_host:port/target_host:port?log=info
    master://api_host:port[/prefix]?log=info&tls=0

``parse`` refuses every mistake with a :class:`URLError` whose message is one
line naming the part that is wrong and what is allowed.  ``format_url`` gives
the canonical form, and ``parse(format_url(c)) == c`` for every config.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar
from urllib.parse import quote, unquote

from nodepass.tunables import format_duration, parse_duration

LOG_LEVELS = ("debug", "info", "warn", "error", "fatal", "none")
TLS_MODES = (0, 1, 2)
RUN_MODES = (0, 1, 2)
PROXY_VERSIONS = (0, 1, 2)
DEFAULT_SLOT = 65536
MAX_RATE = 100_000  # Mbit/s
MAX_TARGETS = 64
MAX_POOL = 65536
DEFAULT_DNS_TTL = 300.0  # NodePass's 5m
BLOCKABLE = {"1": "SOCKS", "2": "HTTP", "3": "TLS"}
POOL_TYPES = {0: "TCP", 1: "QUIC", 2: "WebSocket", 3: "HTTP/2"}
TRANSPORTS = {0: "tcp", 1: "quic", 2: "websocket", 3: "http2"}  # as reports and the API say
SCHEMES = ("server", "client", "master")
DEFAULT_PREFIX = "/api"
MAX_LISTED = 64  # entries in hosts= and origins=
ORIGIN_PORTS = {"http": 80, "https": 443}  # the default port a browser leaves out of Origin

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://(.*)$", re.S)
_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")
_PREFIX = re.compile(r"^(/(?!\.+(/|$))[A-Za-z0-9._~-]+)+$")
_KEY_SAFE = "!$&'()*+,;=-._~"
_PATH_SAFE = "/-._~"


class URLError(ValueError):
    """A URL that nodepass refuses; ``str()`` is a one-line message for the user."""


@dataclass(frozen=True, order=True)
class Address:
    """A host (IPv4, IPv6 or name) and a TCP/UDP port."""

    host: str
    port: int

    @property
    def is_ipv6(self) -> bool:
        return ":" in self.host

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if self.is_ipv6 else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class _Config:
    """Fields shared by every mode; subclasses add theirs."""

    scheme: ClassVar[str]
    log: str = "info"


@dataclass(frozen=True)
class _TunnelConfig(_Config):
    """The run mode and traffic controls shared by servers and clients (docs/usage.md)."""

    tunnel: Address = Address("127.0.0.1", 10101)
    target: Address = Address("127.0.0.1", 8080)
    more_targets: tuple[Address, ...] = ()  # after the first, from a comma-separated list
    tunnel_key: str | None = None
    mode: int = 0
    rate: int = 0  # Mbit/s in each direction; 0 = unlimited
    slot: int = DEFAULT_SLOT  # concurrent connections + UDP sessions; 0 = unlimited
    read: float = 0.0  # idle timeout in seconds; 0 = none
    proxy: int = 0
    dial: str = "auto"
    notcp: int = 0
    noudp: int = 0
    max: int | None = None  # pool capacity bound; None = MAX_POOL_CAPACITY (the server's wins)
    dns: float = DEFAULT_DNS_TTL  # seconds a resolved target name is kept; 0 = every time
    block: str = ""  # digits of BLOCKABLE: kinds of first bytes refused from users
    type: int = 0  # the pool transport: 0 = TCP, 1 = QUIC, 2 = WebSocket, 3 = HTTP/2
    path: str = "/"  # type=2: the WebSocket's HTTP path

    @property
    def targets(self) -> tuple[Address, ...]:
        return (self.target, *self.more_targets)


@dataclass(frozen=True)
class ServerConfig(_TunnelConfig):
    scheme: ClassVar[str] = "server"
    tunnel: Address = Address("0.0.0.0", 10101)
    target: Address = Address("0.0.0.0", 8080)
    tls: int = 0
    crt: str | None = None
    key: str | None = None
    tls_raised: bool = False  # type=1 with tls=0: QUIC has TLS built in, so tls=1


@dataclass(frozen=True)
class ClientConfig(_TunnelConfig):
    scheme: ClassVar[str] = "client"
    min: int | None = None  # pool capacity floor; None = MIN_POOL_CAPACITY
    sni: str | None = None
    ca: str | None = None
    tls: int = 0  # the least TLS mode this client accepts from the server
    tlsproxy: int = 0  # 1: a tls=0 server behind a TLS-terminating proxy it verifies

    @property
    def required_tls(self) -> int:
        """The least TLS mode the server must offer: ``tls=``, or 2 when ``ca=`` or
        ``sni=`` ask for a verified certificate."""
        return 2 if self.ca is not None or self.sni is not None else self.tls


@dataclass(frozen=True)
class MasterConfig(_Config):
    scheme: ClassVar[str] = "master"
    api: Address = Address("127.0.0.1", 9090)
    prefix: str = DEFAULT_PREFIX
    tls: int = 0
    crt: str | None = None
    key: str | None = None
    auth: int = 1
    state: str | None = None
    persist: int = 1
    np: str | None = None  # the NodePass dialect's prefix; None = {prefix}/np
    hosts: tuple[str, ...] = ()  # Host names served besides the listen address's (lowercase)
    origins: tuple[str, ...] = ()  # browser origins allowed cross-origin access
    insecure: int = 0  # auth=0 on a non-loopback address, on purpose

    @property
    def np_prefix(self) -> str:
        """Where the NodePass dialect of the API lives: ``{np_prefix}/v1``."""
        return self.np if self.np is not None else f"{self.prefix}/np"


Config = ServerConfig | ClientConfig | MasterConfig


def derived_key(config: ServerConfig | ClientConfig) -> str:
    """The tunnel key in force: the URL's, else the port in hex, as NodePass does."""
    if config.tunnel_key is not None:
        return config.tunnel_key
    return format(config.tunnel.port, "x")


# ---------------------------------------------------------------------------
# Query parameters: one table says which exist, for which mode, and how to read them.


_ALWAYS = object()


@dataclass(frozen=True)
class _Param:
    name: str
    read: Callable[[str], Any]
    allowed: str
    write: Callable[[Any], str] = str
    default: Any = _ALWAYS  # the canonical URL leaves out a parameter at this value


def _choice(values: tuple[Any, ...]) -> Callable[[str], Any]:
    by_text = {str(v): v for v in values}

    def read(text: str) -> Any:
        if text not in by_text:
            raise ValueError
        return by_text[text]

    return read


def _path(text: str) -> str:
    if not text:
        raise ValueError
    return text


def _bounded(low: int, high: int) -> Callable[[str], int]:
    def read(text: str) -> int:
        if not text.isascii() or not text.isdigit() or not low <= int(text) <= high:
            raise ValueError(text)
        return int(text)

    return read


def _duration(text: str) -> float:
    seconds = parse_duration(text)
    if seconds > 365 * 86400:
        raise ValueError(text)
    return seconds


def _source_ip(text: str) -> str:
    if text == "auto":
        return text
    try:
        return str(ipaddress.ip_address(text.strip("[]") if text.startswith("[") else text))
    except ValueError:
        raise ValueError(text) from None


def _block(text: str) -> str:
    """``0`` (nothing) or distinct digits of BLOCKABLE, kept in order: ``13``."""
    if text == "0":
        return ""
    if not text or len(set(text)) != len(text) or not set(text) <= set(BLOCKABLE):
        raise ValueError(text)
    return "".join(sorted(text))


def _pool_type(text: str) -> int:
    if text not in ("0", "1", "2", "3"):
        raise ValueError(text)
    return int(text)


def _ws_path(text: str) -> str:
    if not text.startswith("/") or any(c.isspace() or c in "?#" for c in text):
        raise ValueError(text)
    return text


def _prefix_param(text: str) -> str:
    if not _PREFIX.match(text.rstrip("/")):
        raise ValueError(text)
    return text.rstrip("/")


def _listed(text: str, name: str, read: Callable[[str], str]) -> tuple[str, ...]:
    """A comma-separated list of distinct entries, each read by ``read`` (which raises
    URLError naming the fault)."""
    if not text:
        raise ValueError(text)
    entries = text.split(",")
    if len(entries) > MAX_LISTED:
        raise URLError(f"query: {name}= lists {len(entries)} entries (allowed: at most "
                       f"{MAX_LISTED})")
    values = []
    for entry in entries:
        if not entry:
            raise URLError(f"query: {name}= has an empty entry (stray ',')")
        values.append(read(entry))
    if len(set(values)) < len(values):
        raise URLError(f"query: {name}= lists the same entry twice")
    return tuple(values)


def _host_name(text: str) -> str:
    """One entry of ``hosts=``: a DNS name, an IPv4 address or a bracketed IPv6 address,
    without a port (the Host check ignores ports)."""
    if not (text.endswith("]") if text.startswith("[") else ":" not in text):
        raise URLError(f"query: hosts: {text!r} has a port or is an IPv6 address without "
                       "brackets (allowed: a name or an IP address without a port, IPv6 in "
                       "brackets like [::1])")
    return parse_host(text, "query: hosts")


def _hosts(text: str) -> tuple[str, ...]:
    return _listed(text, "hosts", _host_name)


_ORIGIN_FORM = ("scheme://host[:port] with scheme http or https and no path, like "
                "https://panel.example.com or http://127.0.0.1:5173")


def parse_origin(text: str) -> str:
    """One entry of ``origins=``: ``scheme://host[:port]`` as a browser sends it in its
    Origin header (lowercase, the scheme's default port left out)."""
    scheme, sep, authority = text.partition("://")
    scheme = scheme.lower()
    if not sep or scheme not in ORIGIN_PORTS:
        raise URLError(f"query: origins: {text!r} is not an origin (allowed: {_ORIGIN_FORM})")
    if any(c in authority for c in "/?#@"):
        raise URLError(f"query: origins: {text!r} has a path, query or user name, which an "
                       f"origin never has (allowed: {_ORIGIN_FORM})")
    if authority.startswith("["):
        close = authority.find("]")
        host_text, port_text = authority[:close + 1], authority[close + 1:]
    elif authority.count(":") > 1:
        raise URLError(f"query: origins: {text!r} has an IPv6 address without brackets "
                       f"(allowed: {_ORIGIN_FORM})")
    else:
        host_text, colon, port_text = authority.partition(":")
        port_text = colon + port_text
    if not host_text or (port_text and not port_text.startswith(":")):
        raise URLError(f"query: origins: {text!r} is not an origin (allowed: {_ORIGIN_FORM})")
    part = f"query: origins: {text!r}"
    host = parse_host(host_text, part)
    port = parse_port(port_text[1:], part) if port_text else ORIGIN_PORTS[scheme]
    shown = f"[{host}]" if ":" in host else host
    return f"{scheme}://{shown}" if port == ORIGIN_PORTS[scheme] else f"{scheme}://{shown}:{port}"


def _origins(text: str) -> tuple[str, ...]:
    if text in ("*", "null"):
        raise URLError(f"query: origins={text} is not allowed (list the panels' origins, like "
                       "https://panel.example.com; with auth=1 and no origins= every origin "
                       "may call the API with the key)")
    return _listed(text, "origins", parse_origin)


def _listed_text(values: tuple[str, ...]) -> str:
    return ",".join(f"[{v}]" if ":" in v and "://" not in v else v for v in values)


def _server_name(text: str) -> str:
    try:
        return parse_host(text, "sni")
    except URLError:
        raise ValueError(text) from None


_PARAMS = {
    p.name: p
    for p in (
        _Param("log", _choice(LOG_LEVELS), "|".join(LOG_LEVELS)),
        _Param("tls", _choice(TLS_MODES), "0|1|2"),
        _Param("crt", _path, "a path to a PEM certificate file",
               lambda v: quote(v, safe=_PATH_SAFE)),
        _Param("key", _path, "a path to a PEM private key file",
               lambda v: quote(v, safe=_PATH_SAFE)),
        _Param("auth", _choice((0, 1)), "0|1"),
        _Param("state", _path, "a directory for the master's state, or a postgresql:// URL "
                                "(a fleet's database, without its password)",
               lambda v: quote(v, safe=_PATH_SAFE)),
        _Param("persist", _choice((0, 1)), "0|1"),
        _Param("sni", _server_name, "a DNS name or IP address to verify the server as"),
        _Param("ca", _path, "a path to a PEM file of trusted CA certificates",
               lambda v: quote(v, safe=_PATH_SAFE)),
        _Param("mode", _choice(RUN_MODES), "0|1|2", default=0),
        _Param("rate", _bounded(0, MAX_RATE), f"0-{MAX_RATE} Mbit/s (0 = unlimited)",
               default=0),
        _Param("slot", _bounded(0, 1_000_000), "0-1000000 connections (0 = unlimited)",
               default=DEFAULT_SLOT),
        _Param("read", _duration, "a duration like 30s, 5m or 1h30m (0 = none)",
               format_duration, default=0.0),
        _Param("proxy", _choice(PROXY_VERSIONS), "0|1|2", default=0),
        _Param("dial", _source_ip, "auto or a local IP address", default="auto"),
        _Param("notcp", _choice((0, 1)), "0|1", default=0),
        _Param("noudp", _choice((0, 1)), "0|1", default=0),
        _Param("min", _bounded(1, MAX_POOL), f"1-{MAX_POOL} pooled connections", default=None),
        _Param("max", _bounded(1, MAX_POOL), f"1-{MAX_POOL} pooled connections", default=None),
        _Param("dns", _duration, "a duration like 30s, 5m or 1h (0 = resolve every time)",
               format_duration, default=DEFAULT_DNS_TTL),
        _Param("block", _block, "0, or digits of 1 (SOCKS), 2 (HTTP), 3 (TLS), like 13",
               default=""),
        _Param("type", _pool_type, "0 (TCP), 1 (QUIC), 2 (WebSocket) or 3 (HTTP/2)",
               default=0),
        _Param("tlsproxy", _choice((0, 1)), "0|1 (1: TLS ends at a reverse proxy this "
               "client verifies; with type=2 and tls=2, sni= or ca=)", default=0),
        _Param("path", _ws_path, "an HTTP path like /tunnel, for type=2 or 3", default="/"),
        _Param("np", _prefix_param, "a path like /api/np: the NodePass dialect's prefix",
               lambda v: quote(v, safe=_PATH_SAFE), default=None),
        _Param("hosts", _hosts, "names this master answers to, like api.example.com,10.0.0.5",
               _listed_text, default=()),
        _Param("origins", _origins, "browser origins, like https://panel.example.com",
               _listed_text, default=()),
        _Param("insecure", _choice((0, 1)), "0|1", default=0),
    )
}

_CONTROLS = ("mode", "read", "rate", "slot", "proxy", "dial", "notcp", "noudp", "dns", "block")
_MODE_PARAMS: Mapping[str, tuple[str, ...]] = {
    "server": ("log", "tls", "crt", "key", *_CONTROLS, "max", "type", "path"),
    "client": ("log", "tls", "sni", "ca", *_CONTROLS, "min", "max", "type", "path",
               "tlsproxy"),
    "master": ("log", "tls", "crt", "key", "auth", "state", "persist", "np", "hosts",
               "origins", "insecure"),
}

_HINTS = {
    ("client", "crt"): " (certificates are set on the server)",
    ("client", "key"): " (certificates are set on the server; the tunnel key goes before '@')",
    ("server", "min"): " (min is the client's pool floor; a server bounds the pool with max)",
}


def _parse_query(scheme: str, query: str) -> dict[str, Any]:
    allowed = _MODE_PARAMS[scheme]
    values: dict[str, Any] = {}
    if not query:
        return values
    for item in query.split("&"):
        if not item:
            raise URLError("query: empty parameter (stray '&')")
        name, eq, raw = item.partition("=")
        name = unquote(name)
        if name not in allowed:
            hint = _HINTS.get((scheme, name), "")
            raise URLError(
                f"query: unknown parameter {name!r} for {scheme}://{hint}"
                f" (allowed: {', '.join(allowed)})"
            )
        if name in values:
            raise URLError(f"query: parameter {name!r} given twice")
        param = _PARAMS[name]
        if not eq:
            raise URLError(f"query: parameter {name!r} needs a value (allowed: {param.allowed})")
        text = unquote(raw)
        try:
            values[name] = param.read(text)
        except URLError:
            raise
        except ValueError:
            raise URLError(
                f"query: bad value {text!r} for {name!r} (allowed: {param.allowed})"
            ) from None
    return values


_USERINFO = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://)[^/?#]*@")


def redacted(text: str) -> str:
    """The URL ``text`` fit for a log line: its key, if it has one, as ``****``."""
    return _USERINFO.sub(r"\1****@", text, count=1)


def given_parameters(text: str) -> frozenset[str]:
    """The parameters the URL ``text`` sets, named as the parser reads them
    (percent-decoded: ``%74ls=2`` sets ``tls``)."""
    scheme, _, _, _, query = _split(text)
    return frozenset(_parse_query(scheme, query))


def _format_query(config: Config) -> str:
    parts = []
    for name in _MODE_PARAMS[config.scheme]:
        value = getattr(config, name)
        if value is None or value == _PARAMS[name].default:
            continue
        if name == "tls" and config.scheme == "client" and not value:
            continue  # a client's least mode: 0 (take what the server offers) goes unsaid
        parts.append(f"{name}={_PARAMS[name].write(value)}")
    return "&".join(parts)


# ---------------------------------------------------------------------------
# Addresses


def parse_host(text: str, part: str) -> str:
    """Validate a host: bracketed IPv6, IPv4 or a DNS name; return it unbracketed."""
    if not text:
        raise URLError(f"{part}: missing host (use 0.0.0.0 or [::] for every interface)")
    if text.startswith("["):
        if not text.endswith("]"):
            raise URLError(f"{part}: unclosed '[' in IPv6 host {text!r}")
        inner = text[1:-1]
        try:
            return str(ipaddress.IPv6Address(inner))
        except ValueError:
            raise URLError(f"{part}: {inner!r} is not an IPv6 address") from None
    if ":" in text:
        raise URLError(f"{part}: IPv6 host {text!r} must be in brackets, like [::1]:8080")
    if re.fullmatch(r"[0-9.]+", text):
        try:
            return str(ipaddress.IPv4Address(text))
        except ValueError:
            raise URLError(f"{part}: {text!r} is not an IPv4 address") from None
    name = text[:-1] if text.endswith(".") else text
    if len(name) > 253 or not all(_LABEL.match(label) for label in name.split(".")):
        raise URLError(
            f"{part}: {text!r} is not a valid host (IPv4, [IPv6] or a DNS name of letters, "
            "digits and '-')"
        )
    return name.lower()


def parse_port(text: str, part: str, listen: bool = False) -> int:
    """A port; with ``listen``, 0 too (any free port: the one taken is logged)."""
    allowed = "0-65535, 0 for any free port" if listen else "1-65535"
    if not text:
        raise URLError(f"{part}: missing port (allowed: {allowed})")
    if not text.isdigit() or not text.isascii():
        raise URLError(f"{part}: port {text!r} is not a number (allowed: {allowed})")
    port = int(text)
    if not (0 if listen else 1) <= port <= 65535:
        raise URLError(f"{part}: port {port} is out of range (allowed: {allowed})")
    return port


def parse_address(text: str, part: str, listen: bool = False) -> Address:
    """``host:port`` or ``[v6]:port`` -> :class:`Address` (port 0 only with ``listen``)."""
    if not text:
        raise URLError(f"{part}: missing (expected host:port)")
    if text.startswith("["):
        close = text.find("]")
        if close < 0:
            raise URLError(f"{part}: unclosed '[' in {text!r}")
        host_text, rest = text[: close + 1], text[close + 1 :]
        if not rest.startswith(":"):
            raise URLError(f"{part}: missing port after {host_text} (expected [host]:port)")
        port_text = rest[1:]
    else:
        host_text, colon, port_text = text.rpartition(":")
        if not colon:
            raise URLError(f"{part}: missing port in {text!r} (expected host:port)")
    return Address(parse_host(host_text, part), parse_port(port_text, part, listen))


# ---------------------------------------------------------------------------
# Whole URLs


def _split(text: str) -> tuple[str, str, str, str, str]:
    """-> scheme, userinfo, host:port, path, query (still percent-encoded)."""
    if any(c.isspace() for c in text):
        raise URLError("URL: contains white space (quote the whole URL in your shell)")
    match = _SCHEME.match(text)
    if not match:
        raise URLError(
            f"URL: {text!r} has no scheme (expected server://, client:// or master://)"
        )
    scheme, rest = match.group(1).lower(), match.group(2)
    if scheme not in SCHEMES:
        raise URLError(f"scheme: unknown {scheme!r} (allowed: server, client, master)")
    if "#" in rest:
        raise URLError("URL: a '#fragment' is not allowed")
    rest, _, query = rest.partition("?")
    slash = rest.find("/")
    authority, path = (rest, "") if slash < 0 else (rest[:slash], rest[slash:])
    userinfo, at, hostport = authority.rpartition("@")
    if not at:
        userinfo = ""
    elif not userinfo:
        raise URLError("key: empty key before '@' (omit the '@' to use the default key)")
    return scheme, userinfo, hostport, path, query


def _check_least_tls(values: dict[str, Any]) -> None:
    """A client's ``tls`` is the least mode it accepts; ``ca``/``sni`` mean 2."""
    verifying = [n for n in ("ca", "sni") if n in values]
    if verifying and values.get("tls", 2) != 2:
        given = " and ".join(f"{n}=" for n in verifying)
        raise URLError(f"query: {given} means a verified certificate, tls=2, not "
                       f"tls={values['tls']} (remove tls, or set tls=2)")
    if values.get("tlsproxy") and (values.get("type") != 2
                                   or not (verifying or values.get("tls") == 2)):
        raise URLError("query: tlsproxy=1 is for a WebSocket client in TLS it verifies "
                       "(allowed with type=2 and tls=2, sni= or ca=)")


def _check_tls_files(values: dict[str, Any], files: bool = True) -> None:
    tls = values.get("tls", 0)
    crt, key = values.get("crt"), values.get("key")
    if tls != 2:
        if crt is not None or key is not None:
            raise URLError("query: 'crt' and 'key' are only used with tls=2")
        return
    if crt is None or key is None:
        missing = " and ".join(n for n in ("crt", "key") if values.get(n) is None)
        raise URLError(f"query: tls=2 needs {missing} (paths to PEM files)")
    for name in ("crt", "key"):
        if files:
            _check_readable(name, values[name])


def _check_readable(name: str, path: str) -> None:
    if not os.path.isfile(path):
        raise URLError(f"query: {name} file {path!r} does not exist or is not a file")
    try:
        with open(path, "rb"):
            pass
    except OSError as e:
        raise URLError(f"query: {name} file {path!r} is not readable ({e.strerror})") from None


def parse(text: str, files: bool = True) -> Config:
    """Parse a nodepass URL into a frozen config, or raise :class:`URLError`.
    ``files=False``: the files it names (``crt``, ``key``, ``ca``) are another host's,
    not looked for here."""
    scheme, userinfo, hostport, path, query = _split(text)
    values = _parse_query(scheme, query)
    if scheme == "client":
        _check_least_tls(values)
    elif "tls" in _MODE_PARAMS[scheme]:
        _check_tls_files(values, files)

    if scheme == "master":
        if userinfo:
            raise URLError("master: a key before '@' is not allowed in a master URL")
        prefix = _parse_prefix(path)
        np = values.get("np")
        if np is not None and (np == prefix or np.startswith(f"{prefix}/v1/")):
            raise URLError(f"query: np={np} would overlap the API at {prefix}/v1; choose "
                           f"another path (the default is {prefix}/np)")
        api = parse_address(hostport, "API address", listen=True)
        _check_keyless(api, values.get("auth", 1), values.get("insecure", 0))
        return MasterConfig(api=api, prefix=prefix, **values)

    part = "tunnel address" if scheme == "server" else "server address"
    tunnel = parse_address(hostport, part, listen=True)
    if not path or path == "/":
        raise URLError("target address: missing (expected /target_host:port after the tunnel)")
    targets = _parse_targets(path[1:])
    _check_dialed_ports(scheme, values.get("mode", 0), tunnel, targets)
    key = unquote(userinfo) if userinfo else None
    if "ca" in values and files:
        _check_readable("ca", values["ca"])
    if values.get("min") is not None and values.get("max") is not None \
            and values["min"] > values["max"]:
        raise URLError(f"query: min={values['min']} is greater than max={values['max']} "
                       "(allowed: min <= max)")
    if values.get("notcp") and values.get("noudp"):
        raise URLError("query: notcp=1 and noudp=1 together leave nothing to carry")
    _check_dial_family(values.get("dial", "auto"), targets)
    if scheme == "server" and values.get("mode") == 1 and len(targets) > 1:
        raise URLError("target address: a server in mode=1 listens on its target, so it takes "
                       "one address (a list is for dialing: mode=2 or mode=0)")
    if scheme == "server" and values.get("type") == 1 and values.get("tls", 0) == 0:
        values.update(tls=1, tls_raised=True)
    cls = ServerConfig if scheme == "server" else ClientConfig
    return cls(tunnel=tunnel, target=targets[0], more_targets=targets[1:], tunnel_key=key,
               **values)


def is_loopback(host: str) -> bool:
    """Whether ``host`` (as parsed: unbracketed, lowercase) only reaches this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name other than localhost may resolve anywhere


def _check_keyless(api: Address, auth: int, insecure: int) -> None:
    """A master without a key lets whoever reaches it run programs as its user: only on
    a loopback address, unless the operator says ``insecure=1``."""
    if insecure and auth:
        raise URLError("query: insecure=1 only goes with auth=0 (it allows serving the API "
                       "without a key on a non-loopback address)")
    if not auth and not insecure and not is_loopback(api.host):
        raise URLError(f"query: auth=0 on {api} would let anyone who can reach that address "
                       "run programs through the API (allowed: auth=0 on a loopback address "
                       "such as 127.0.0.1 or localhost; to serve without a key there anyway, "
                       "add insecure=1)")


def _check_dialed_ports(scheme: str, mode: int, tunnel: Address,
                        targets: tuple[Address, ...]) -> None:
    """Port 0 (any free port) is for addresses this end listens on, never one it dials."""
    dialed = []
    if scheme == "server" and (mode == 2 or len(targets) > 1):
        dialed.append(("target address", targets))
    if scheme == "client" and mode == 2:
        dialed.append(("server address", (tunnel,)))
    if scheme == "client" and mode == 1:
        dialed.append(("target address", targets))
    for part, addresses in dialed:
        if any(a.port == 0 for a in addresses):
            raise URLError(f"{part}: port 0 means any free port, which only an address this "
                           "end listens on may use (allowed here: 1-65535)")


def _check_dial_family(dial: str, targets: tuple[Address, ...]) -> None:
    """A source address of one IP family cannot reach a target of the other."""
    if dial == "auto":
        return
    version = ipaddress.ip_address(dial).version
    for target in targets:
        try:
            other = ipaddress.ip_address(target.host).version
        except ValueError:
            continue  # a name: it may resolve to either family
        if other != version:
            raise URLError(f"query: dial={dial} is IPv{version} but target {target} is "
                           f"IPv{other}; use auto or an IPv{other} address")


def format_targets(targets: tuple[Address, ...]) -> str:
    """A target list as the URL writes it: ``host:port[,host:port...]``."""
    return ",".join(str(t) for t in targets)


def _parse_targets(text: str) -> tuple[Address, ...]:
    """``host:port[,host:port...]``: one target, or several to rotate across."""
    parts = text.split(",")
    if len(parts) > MAX_TARGETS:
        raise URLError(f"target address: {len(parts)} targets (allowed: at most {MAX_TARGETS})")
    targets = []
    for i, part in enumerate(parts):
        if not part and len(parts) > 1:
            raise URLError("target address: empty entry in the list (stray ',')")
        what = "target address" if len(parts) == 1 else f"target address #{i + 1}"
        targets.append(parse_address(part, what, listen=len(parts) == 1))
    if len(set(targets)) < len(targets):
        raise URLError("target address: the same target is listed twice")
    return tuple(targets)


def _parse_prefix(path: str) -> str:
    if path in ("", "/"):
        return DEFAULT_PREFIX
    prefix = path.rstrip("/")
    if not _PREFIX.match(prefix):
        raise URLError(
            f"API prefix: {path!r} is not allowed (letters, digits and '.', '_', '~', '-' "
            "in '/'-separated parts, like /api or /admin/np)"
        )
    return prefix


def format_url(config: Config) -> str:
    """The canonical URL of ``config``: every parameter in force, in a fixed order."""
    if isinstance(config, MasterConfig):
        head = f"master://{config.api}{config.prefix}"
    else:
        key = config.tunnel_key
        userinfo = "" if key is None else quote(key, safe=_KEY_SAFE) + "@"
        head = f"{config.scheme}://{userinfo}{config.tunnel}/{format_targets(config.targets)}"
    query = _format_query(config)
    return f"{head}?{query}" if query else head
