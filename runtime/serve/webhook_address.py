"""Where a webhook may go: the URL's host resolved to addresses, every one of them checked.

A webhook makes the server send a request where a client says, so a client could aim it at the server's own
network: loopback, a private range, the cloud metadata address. Host names are resolved here (the system
resolver also reads numeric spellings such as `2130706433`, `0x7f000001` or `0177.1`) and each address is
classified with `ipaddress`; IPv6 forms that carry an IPv4 address (mapped, 6to4, Teredo, NAT64) are
judged by that address too. The delivery then connects to the address that was checked, never resolving
the name again, so a DNS answer that changes in between cannot redirect it.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from urllib.parse import SplitResult, urlsplit

from ..errors import InvalidRequestError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
NAT64 = ipaddress.ip_network("64:ff9b::/96")
CGNAT = ipaddress.ip_network("100.64.0.0/10")


@dataclass(frozen=True)
class Target:
    """A checked webhook URL: its parts, and the address the delivery connects to."""

    parts: SplitResult
    address: IPAddress

    @property
    def port(self) -> int:
        """The URL's port, or the scheme's."""
        return self.parts.port or (443 if self.parts.scheme == "https" else 80)

    def pinned_url(self) -> str:
        """The URL with its host replaced by the checked address (the Host header and TLS name keep the
        original host)."""
        host = f"[{self.address}]" if self.address.version == 6 else str(self.address)
        return self.parts._replace(netloc=f"{host}:{self.port}").geturl()

    def host_header(self) -> str:
        """The Host header the URL's own host would have sent."""
        host = self.parts.hostname or ""
        name = f"[{host}]" if ":" in host else host
        return name if self.parts.port is None else f"{name}:{self.parts.port}"


def refusal(address: IPAddress) -> str | None:
    """Why a webhook may not go to this address (loopback, private, ...), or None for a public one."""
    embedded = _embedded_ipv4(address)
    if embedded is not None:
        why = refusal(embedded)
        return f"{why} (inside {address})" if why else None
    for reason, hit in (("loopback", address.is_loopback), ("unspecified", address.is_unspecified),
                        ("link-local", address.is_link_local), ("multicast", address.is_multicast),
                        ("private", address.is_private), ("reserved", address.is_reserved),
                        ("shared (carrier-grade NAT)", address in CGNAT if address.version == 4 else False),
                        ("site-local", getattr(address, "is_site_local", False)),
                        ("not globally routable", not address.is_global)):
        if hit:
            return reason
    return None


def _embedded_ipv4(address: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address stands for (mapped, 6to4, Teredo client, NAT64), if any."""
    if address.version != 6:
        return None
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address.teredo is not None:
        return address.teredo[1]
    if address in NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def parse_webhook_url(url: str, allowed_hosts: list[str]) -> SplitResult:
    """The URL's parts if it is a well-formed http(s) URL whose host is allowed here; InvalidRequestError on
    `webhook_url` otherwise. No name is resolved."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018  (raises ValueError on a port that is not a number in range)
    except ValueError as exc:
        raise InvalidRequestError(f"webhook_url is not a valid URL: {exc}", param="webhook_url") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidRequestError(f"webhook_url must be an http(s) URL with a host (got {url!r})",
                                  param="webhook_url")
    if parts.username is not None or parts.password is not None:
        raise InvalidRequestError("webhook_url must not carry a user name or password", param="webhook_url")
    if allowed_hosts and not is_listed(parts.hostname, allowed_hosts):
        raise InvalidRequestError(f"webhook_url host {parts.hostname!r} is not allowed on this server; allowed: "
                                  f"{', '.join(allowed_hosts)}", param="webhook_url")
    return parts


def is_listed(host: str, allowed_hosts: list[str]) -> bool:
    """Whether `host` is one of the operator's `--webhook-allow` hosts (names compared without case)."""
    return host.lower().strip("[]") in {h.lower().strip("[]") for h in allowed_hosts}


def resolve_target(url: str, allowed_hosts: list[str]) -> Target:
    """The checked URL and the address to connect to: the host resolved (numeric spellings included) and every
    address it resolves to public, unless the host is listed in `allowed_hosts`. InvalidRequestError on
    `webhook_url` saying why not. Blocks on DNS: call it off the event loop."""
    parts = parse_webhook_url(url, allowed_hosts)
    host = parts.hostname or ""
    try:
        infos = socket.getaddrinfo(host, parts.port or 0, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:
        raise InvalidRequestError(f"webhook_url host {host!r} does not resolve: {exc}", param="webhook_url") from None
    addresses = [ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos]
    if not addresses:
        raise InvalidRequestError(f"webhook_url host {host!r} has no address", param="webhook_url")
    if not is_listed(host, allowed_hosts):
        for address in addresses:
            why = refusal(address)
            if why:
                raise InvalidRequestError(
                    f"webhook_url host {host!r} resolves to {address}, which is {why}; webhooks go to public "
                    "addresses only, unless the server lists the host in --webhook-allow", param="webhook_url")
    return Target(parts, addresses[0])
