"""Which URLs and hosts images may be fetched from (SSRF policy): small functions, no HTTP.

* Host names are normalised first (:func:`normalize_host`): lower case, no trailing dot, IDNA,
  and any IPv4 spelling (``2130706433``, ``0x7f.1``, ``0177.0.0.1``, ``127.1``,
  ``[::ffff:127.0.0.1]``) as a dotted quad. URLs with ``user@`` credentials are refused.
* An allow-listed host (``name``, ``name:port`` or ``*.example.com`` for subdomains) is resolved
  once (:func:`checked_address`); if ANY address it resolves to is loopback, private, CGNAT, link-local,
  multicast, reserved, unspecified or a cloud metadata address (also in IPv4-mapped/compatible, NAT64,
  6to4 or Teredo IPv6 form) it is refused (:func:`address_problem`), and the caller connects to the checked
  address itself (no second DNS lookup, so no DNS rebinding). ``allow_private`` (``ALLOW_PRIVATE_IMAGE_HOSTS``)
  lets allow-listed hosts be loopback/private/CGNAT/unique-local; link-local, metadata,
  multicast and reserved addresses stay refused.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from dataclasses import dataclass
from urllib.parse import SplitResult, parse_qsl, quote, urlencode, urlsplit

_SAFE_QUERY_KEYS = {"d", "fileuri"}


class Refused(Exception):
    """A URL or host the policy refuses (or cannot parse); the message says why."""


def redact_url(url: str) -> str:
    """A URL safe to show in messages: no userinfo, no fragment, query values masked."""
    if url.startswith("data:"):
        return url.split(",", 1)[0] + ",..."
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        if parts.port is not None:
            host = f"{host}:{parts.port}"
    except ValueError:
        return "<malformed URL>"
    shown = f"{parts.scheme}://{host}{parts.path}" if parts.scheme else parts.path
    if parts.query:
        pairs = parse_qsl(parts.query, keep_blank_values=True)
        masked = [(k, v if k in _SAFE_QUERY_KEYS else "***") for k, v in pairs]
        shown += "?" + urlencode(masked, quote_via=quote, safe="*/")
    return shown if len(shown) <= 300 else shown[:297] + "..."


# ---- host names and addresses ----------------------------------------------------

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_HOST_NAME = re.compile(r"[a-z0-9_-]+(\.[a-z0-9_-]+)*")
_NUMBER = re.compile(r"0x[0-9a-f]*|[0-9]+")  # a label an IPv4 parser reads as a number
_NETLOC_ASCII_OK = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-_:[]")
_ip = ipaddress.ip_address
_net = ipaddress.ip_network

# never fetched, whatever the settings
_METADATA = frozenset(map(_ip, ("169.254.169.254", "fd00:ec2::254", "100.100.100.200")))
# fetched from allow-listed hosts only with allow_private (ALLOW_PRIVATE_IMAGE_HOSTS)
_PRIVATE = tuple((_net(n), what) for n, what in (
    ("127.0.0.0/8", "loopback"), ("::1/128", "loopback"),
    ("10.0.0.0/8", "private"), ("172.16.0.0/12", "private"), ("192.168.0.0/16", "private"),
    ("100.64.0.0/10", "carrier-grade NAT"), ("fc00::/7", "unique-local (private)"),
))
# special-purpose ranges (RFC 6890 and friends) that ipaddress's is_global misses in some versions
_NON_PUBLIC = tuple(map(_net, (
    "0.0.0.0/8", "192.0.0.0/24", "192.0.2.0/24", "198.18.0.0/15", "198.51.100.0/24", "203.0.113.0/24",
    "240.0.0.0/4", "::/96", "64:ff9b:1::/48", "100::/64", "2001::/23", "2001:db8::/32", "fec0::/10",
)))
_NAT64 = _net("64:ff9b::/96")


def _ipv4_number(label: str) -> int:
    if label.startswith("0x"):
        return int(label[2:] or "0", 16)
    if len(label) > 1 and label.startswith("0"):
        return int(label, 8)  # ValueError on 8 or 9, as inet_aton refuses them
    return int(label)


def _parse_ipv4(labels: list[str]) -> ipaddress.IPv4Address:
    """inet_aton's (and browsers') reading: 1 to 4 numbers, each decimal, 0x-hex or 0-octal;
    the last one fills the remaining bytes (``127.1`` is 127.0.0.1, ``2130706433`` too)."""
    if len(labels) > 4:
        raise ValueError("more than 4 numbers in an IPv4 address")
    try:
        numbers = [_ipv4_number(label) for label in labels]
    except ValueError:
        raise ValueError("a host ending in a number must be an IPv4 address") from None
    *head, last = numbers
    if any(n > 255 for n in head) or last >= 256 ** (5 - len(numbers)):
        raise ValueError("IPv4 address out of range")
    value = last
    for i, n in enumerate(head):
        value += n << (8 * (3 - i))
    return ipaddress.IPv4Address(value)


def normalize_host(host: str) -> str:
    """The canonical form of a URL's host, the one the allow-list and the Label Studio origin are
    compared with: lower case, no trailing dot, IDNA (ASCII), IPv4 addresses in any spelling as a
    dotted quad, IPv6 compressed (an IPv4-mapped one as its IPv4 address). ValueError if invalid."""
    h = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if ":" in h:
        if "%" in h:
            raise ValueError("IPv6 zone identifiers are not supported")
        ip6 = ipaddress.IPv6Address(h)  # ValueError
        return str(ip6.ipv4_mapped) if ip6.ipv4_mapped else ip6.compressed
    if not h.isascii():
        try:
            h = h.encode("idna").decode("ascii")
        except UnicodeError:
            raise ValueError("invalid internationalised host name") from None
    h = h.lower()
    if h.endswith("."):
        h = h[:-1]
    if not _HOST_NAME.fullmatch(h):
        raise ValueError("invalid host name")
    labels = h.split(".")
    if _NUMBER.fullmatch(labels[-1]):  # ends in a number: an IPv4 address, however spelled
        return str(_parse_ipv4(labels))
    return h


def _as_ip(host: str) -> IPAddress | None:
    try:
        return _ip(host)
    except ValueError:
        return None


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one reaches: mapped, compatible, NAT64, 6to4, Teredo."""
    if ip.ipv4_mapped:
        return ip.ipv4_mapped
    if int(ip) >> 32 == 0 and int(ip) > 1 or ip in _NAT64:  # ::a.b.c.d, 64:ff9b::a.b.c.d
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if ip.sixtofour:
        return ip.sixtofour
    if ip.teredo:
        return ip.teredo[1]
    return None


def address_problem(address: str | IPAddress, allow_private: bool = False) -> str | None:
    """Why an image may not be fetched from ``address`` (None: it may). Cloud metadata,
    link-local, multicast, unspecified and reserved addresses are always refused; loopback,
    private (RFC 1918, unique-local) and CGNAT ones unless ``allow_private``."""
    ip = _ip(address) if isinstance(address, str) else address
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = _embedded_ipv4(ip)
        if embedded is not None:
            problem = address_problem(embedded, allow_private)
            if problem:
                return f"{problem} (as {ip})"
            if not ip.teredo:  # a Teredo address is judged as itself too (2001::/23: reserved)
                return None
    if ip in _METADATA:
        return "a cloud metadata address"
    if ip.is_unspecified or ip in _net("0.0.0.0/8"):
        return "an unspecified address"
    if ip.is_link_local:
        return "a link-local address"
    if ip.is_multicast:
        return "a multicast address"
    for network, what in _PRIVATE:
        if ip in network:
            return None if allow_private else f"a {what} address"
    if ip.is_reserved or not ip.is_global or any(ip in n for n in _NON_PUBLIC):
        return "a reserved (non-public) address"
    return None


def _split_host_port(entry: str) -> tuple[str, int | None]:
    if entry.startswith("["):
        host, _, rest = entry[1:].partition("]")
        if rest and not rest.startswith(":"):
            raise ValueError("junk after ']'")
        port = rest[1:] if rest else None
    elif entry.count(":") == 1:
        host, port = entry.split(":")
    else:
        host, port = entry, None
    if port is None:
        return host, None
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"invalid port {port!r}")
    return host, int(port)


def parse_allowed_hosts(entries: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """Validate and normalise allow-list entries (a comma-separated string or a sequence):
    ``name``, ``name:port``, ``*.example.com`` (any subdomain, any port), IP addresses. A URL's
    host must equal an entry after both are normalised. ValueError names a bad entry."""
    items = entries.split(",") if isinstance(entries, str) else list(entries)
    out: list[str] = []
    for raw in items:
        entry = raw.strip()
        if not entry:
            continue
        try:
            if "/" in entry or "@" in entry:
                raise ValueError("give a host name (no scheme, path or user)")
            if entry.startswith("*."):
                suffix = normalize_host(entry[2:])
                if _as_ip(suffix) is not None or "." not in suffix:
                    raise ValueError("a wildcard needs a domain with a dot, like *.example.com")
                out.append("*." + suffix)
                continue
            host, port = _split_host_port(entry)
            host = normalize_host(host)
            host = f"[{host}]" if ":" in host else host
            out.append(f"{host}:{port}" if port else host)
        except ValueError as e:
            raise ValueError(f"allowed image host {entry!r} is invalid: {e}") from None
    return tuple(dict.fromkeys(out))


@dataclass(frozen=True)
class Url:
    """An http(s) URL as parsed and normalised here; requests get rebuilt from it."""

    scheme: str
    host: str  # normalize_host's form
    port: int
    path: str  # path and query

    @property
    def origin(self) -> tuple[str, str, int]:
        return self.scheme, self.host, self.port

    @property
    def netloc(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.scheme == "https" else 80
        return host if self.port == default else f"{host}:{self.port}"


def split_url(url: str) -> SplitResult:
    """urlsplit, with a bad port found now: Refused("malformed URL") before any connection."""
    try:
        parts = urlsplit(url)
        _ = parts.port  # raises ValueError on a bad port
    except ValueError:
        raise Refused("malformed URL") from None
    return parts


def parse_url(url: str) -> Url:
    """Split and normalise an http(s) URL; Refused (before any connection) if it is not one."""
    parts = split_url(url)
    port = parts.port
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise Refused(f"unsupported URL scheme {scheme or '(none)'!r}")
    if "@" in parts.netloc:
        raise Refused("URLs with credentials (user@host) are not allowed")
    if not parts.hostname:
        raise Refused("URL has no host")
    if any(c not in _NETLOC_ASCII_OK if c.isascii() else not c.isprintable() or c.isspace()
           for c in parts.netloc):
        raise Refused("malformed host in URL")
    try:
        host = normalize_host(parts.hostname)
    except ValueError as e:
        raise Refused(f"malformed host in URL ({e})") from None
    if port == 0:
        raise Refused("malformed URL (port 0)")
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return Url(scheme, host, port or (443 if scheme == "https" else 80), path)




def host_allowed(url: Url, allowed_hosts: tuple[str, ...]) -> bool:
    """Whether a parsed URL's host (and port) matches an ALLOWED_IMAGE_HOSTS entry (parse_allowed_hosts's form)."""
    host = f"[{url.host}]" if ":" in url.host else url.host
    if host in allowed_hosts or f"{host}:{url.port}" in allowed_hosts:
        return True
    suffixes = tuple(h[1:] for h in allowed_hosts if h.startswith("*."))  # ".example.com"
    return bool(suffixes) and _as_ip(url.host) is None and url.host.endswith(suffixes)


def checked_address(host: str, port: int, allow_private: bool = False, hint: str = "") -> str:
    """Resolve ``host`` once; Refused if any address is off limits; else the address to connect to."""
    literal = _as_ip(host)
    if literal is not None:
        addresses = [literal]
    else:
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError):
            raise Refused(f"cannot resolve host {host!r}") from None
        addresses = []
        for family, _, _, _, sockaddr in infos:
            if family in (socket.AF_INET, socket.AF_INET6):
                address = _ip(str(sockaddr[0]).split("%")[0])
                if address not in addresses:
                    addresses.append(address)
        if not addresses:
            raise Refused(f"cannot resolve host {host!r}")
    for address in addresses:
        problem = address_problem(address, allow_private)
        if problem:
            where = f"{host}" if literal is not None else f"{host} (it resolves to {address})"
            private_hint = ""
            if hint == "allowed" and not allow_private and address_problem(address, True) is None:
                private_hint = "; ALLOW_PRIVATE_IMAGE_HOSTS=true allows internal allow-listed hosts"
            elif hint == "signed":
                private_hint = "; signed URLs must be on public hosts unless their host is allow-listed"
            raise Refused(f"refusing to fetch from {where}: {problem}{private_hint}")
    return str(addresses[0])
