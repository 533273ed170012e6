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

LOG_LEVELS = ("debug", "info", "warn", "error", "fatal", "none")
TLS_MODES = (0, 1, 2)
SCHEMES = ("server", "client", "master")
DEFAULT_PREFIX = "/api"

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
class ServerConfig(_Config):
    scheme: ClassVar[str] = "server"
    tunnel: Address = Address("0.0.0.0", 10101)
    target: Address = Address("0.0.0.0", 8080)
    tunnel_key: str | None = None
    tls: int = 0
    crt: str | None = None
    key: str | None = None


@dataclass(frozen=True)
class ClientConfig(_Config):
    scheme: ClassVar[str] = "client"
    tunnel: Address = Address("127.0.0.1", 10101)
    target: Address = Address("127.0.0.1", 8080)
    tunnel_key: str | None = None
    sni: str | None = None
    ca: str | None = None


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


Config = ServerConfig | ClientConfig | MasterConfig


def derived_key(config: ServerConfig | ClientConfig) -> str:
    """The tunnel key in force: the URL's, else the port in hex, as NodePass does."""
    if config.tunnel_key is not None:
        return config.tunnel_key
    return format(config.tunnel.port, "x")


# ---------------------------------------------------------------------------
# Query parameters: one table says which exist, for which mode, and how to read them.


@dataclass(frozen=True)
class _Param:
    name: str
    read: Callable[[str], Any]
    allowed: str
    write: Callable[[Any], str] = str


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
        _Param("state", _path, "a directory for the master's state",
               lambda v: quote(v, safe=_PATH_SAFE)),
        _Param("persist", _choice((0, 1)), "0|1"),
        _Param("sni", _server_name, "a DNS name or IP address to verify the server as"),
        _Param("ca", _path, "a path to a PEM file of trusted CA certificates",
               lambda v: quote(v, safe=_PATH_SAFE)),
    )
}

_MODE_PARAMS: Mapping[str, tuple[str, ...]] = {
    "server": ("log", "tls", "crt", "key"),
    "client": ("log", "sni", "ca"),
    "master": ("log", "tls", "crt", "key", "auth", "state", "persist"),
}

_HINTS = {
    ("client", "tls"): " (a client adopts the server's TLS mode; remove 'tls')",
    ("client", "crt"): " (certificates are set on the server)",
    ("client", "key"): " (certificates are set on the server; the tunnel key goes before '@')",
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
        except ValueError:
            raise URLError(
                f"query: bad value {text!r} for {name!r} (allowed: {param.allowed})"
            ) from None
    return values


def _format_query(config: Config) -> str:
    parts = []
    for name in _MODE_PARAMS[config.scheme]:
        value = getattr(config, name)
        if value is None:
            continue
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


def parse_port(text: str, part: str) -> int:
    if not text:
        raise URLError(f"{part}: missing port (allowed: 1-65535)")
    if not text.isdigit() or not text.isascii():
        raise URLError(f"{part}: port {text!r} is not a number (allowed: 1-65535)")
    port = int(text)
    if not 1 <= port <= 65535:
        raise URLError(f"{part}: port {port} is out of range (allowed: 1-65535)")
    return port


def parse_address(text: str, part: str) -> Address:
    """``host:port`` or ``[v6]:port`` -> :class:`Address`."""
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
    return Address(parse_host(host_text, part), parse_port(port_text, part))


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


def _check_tls_files(values: dict[str, Any]) -> None:
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
        _check_readable(name, values[name])


def _check_readable(name: str, path: str) -> None:
    if not os.path.isfile(path):
        raise URLError(f"query: {name} file {path!r} does not exist or is not a file")
    try:
        with open(path, "rb"):
            pass
    except OSError as e:
        raise URLError(f"query: {name} file {path!r} is not readable ({e.strerror})") from None


def parse(text: str) -> Config:
    """Parse a nodepass URL into a frozen config, or raise :class:`URLError`."""
    scheme, userinfo, hostport, path, query = _split(text)
    values = _parse_query(scheme, query)
    if "tls" in _MODE_PARAMS[scheme]:
        _check_tls_files(values)

    if scheme == "master":
        if userinfo:
            raise URLError("master: a key before '@' is not allowed in a master URL")
        return MasterConfig(api=parse_address(hostport, "API address"),
                            prefix=_parse_prefix(path), **values)

    part = "tunnel address" if scheme == "server" else "server address"
    tunnel = parse_address(hostport, part)
    if not path or path == "/":
        raise URLError("target address: missing (expected /target_host:port after the tunnel)")
    target = parse_address(path[1:], "target address")
    key = unquote(userinfo) if userinfo else None
    if "ca" in values:
        _check_readable("ca", values["ca"])
    cls = ServerConfig if scheme == "server" else ClientConfig
    return cls(tunnel=tunnel, target=target, tunnel_key=key, **values)


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
        head = f"{config.scheme}://{userinfo}{config.tunnel}/{config.target}"
    query = _format_query(config)
    return f"{head}?{query}" if query else head
