"""The guard on outbound URLs: requests a tenant can aim (the `http` tool, webhooks) must not
reach the platform's own network (loopback, private ranges, cloud metadata at 169.254.169.254).

Three layers, so that each caller gets the shape it needs:

- `is_public_url(url) -> (ok, reason)`: the plain question, no settings, never raises.
- `check_outbound_url(url)`: the policy. Honours `SWITCHYARD_ALLOW_PRIVATE_URLS` and raises
  `ForbiddenURL` (a `ValueError`, free of step concepts) so that webhook delivery can record
  the refusal its own way.
- `check_public_url(url)`: the same policy for step handlers, raising
  `StepFailure(code="forbidden_address", retryable=False)`.

Every message (refusals, errors, logs) shows an outbound URL through `redact_url`: a tenant's
URL may carry credentials in its userinfo or query string (`?token=…`), and messages end up in
logs, step errors and delivery records.

A host that cannot be resolved is not a policy refusal (DNS fails transiently), so
`check_outbound_url` lets `socket.gaierror` through and `check_public_url` turns it into a
retryable `http_error`.

The check before a request gives a clear refusal early; the connection itself is guarded too:
`guarded_client()` is an httpx client whose network backend resolves the host once, refuses if
any address is not public (unless `SWITCHYARD_ALLOW_PRIVATE_URLS`), and connects to an address
it checked, so a DNS server that answers differently on a second lookup (DNS rebinding) gains
nothing. TLS still verifies the certificate against the host name. Redirects are not followed
(a redirect is a new request the caller has not checked).
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpcore
import httpx
from django.conf import settings

from jobs.steps.registry import StepFailure

ALLOWED_SCHEMES = ("http", "https")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Checked in this order; the first that applies names the reason.
_REFUSED_KINDS = (
    ("is_loopback", "a loopback address"),
    ("is_link_local", "a link-local address"),
    ("is_unspecified", "an unspecified address"),
    ("is_multicast", "a multicast address"),
    ("is_reserved", "a reserved address"),
    ("is_private", "a private address"),
)


class ForbiddenURL(ValueError):
    """The URL may not be requested: wrong scheme, or it resolves to a non-public address."""


def non_public_kind(address: IPAddress) -> str | None:
    """What kind of non-public address `address` is ("a loopback address"), or None if public.

    An IPv4-mapped IPv6 address (::ffff:127.0.0.1) is judged by the IPv4 address it embeds,
    which is what a connection to it reaches; a 6to4 address (2002::/16) must pass both ways.
    """
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            # Judged explicitly: before Python 3.13 every mapped address counts as private.
            address = address.ipv4_mapped
        elif address.sixtofour is not None and non_public_kind(address.sixtofour):
            return f"a 6to4 address of {non_public_kind(address.sixtofour)}"
    for attribute, description in _REFUSED_KINDS:
        if getattr(address, attribute):
            return description
    # Ranges that are none of the above yet not routable on the internet either, such as
    # carrier-grade NAT (100.64.0.0/10), which cloud providers use internally.
    if not address.is_global:
        return "not a public address"
    return None


def _shown(address: IPAddress) -> str:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return f"::ffff:{address.ipv4_mapped}"
    return str(address)


REDACTED = "***"


def redact_url(url: object) -> str:
    """`url` as logs and messages may show it: userinfo and query replaced by `***`, the
    fragment dropped; scheme, host, port and path kept (what one needs to tell URLs apart)."""
    text = str(url)
    try:
        parts = urlsplit(text)
    except ValueError:  # an unclosed IPv6 bracket and the like: no part can be told apart
        return "<unparsable URL>"
    netloc = parts.netloc
    if "@" in netloc:
        netloc = f"{REDACTED}@{netloc.rpartition('@')[2]}"
    return urlunsplit((parts.scheme, netloc, parts.path, REDACTED if parts.query else "", ""))


def _split(url: str) -> tuple[str, int]:
    """The host and port of `url`; raises ForbiddenURL for a scheme or shape we do not request."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ForbiddenURL(f"invalid URL {redact_url(url)!r}: {exc}") from None
    if parts.scheme.lower() not in ALLOWED_SCHEMES:
        raise ForbiddenURL(f"URL scheme must be http or https, not {parts.scheme!r}")
    if not parts.hostname:
        raise ForbiddenURL(f"URL has no host: {redact_url(url)!r}")
    if port is None:
        port = 443 if parts.scheme.lower() == "https" else 80
    return parts.hostname, port


def _literal(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None  # a name, not an address


def _resolve(host: str, port: int) -> list[IPAddress]:
    """Every address `host` resolves to. Raises socket.gaierror (an OSError)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except UnicodeError:  # a name IDNA cannot encode (an empty or over-long label)
        raise ForbiddenURL(f"invalid host name {host!r}") from None
    # IPv6 link-local answers carry a zone ("fe80::1%eth0") that ipaddress does not parse.
    return [ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]) for info in infos]


def _first_non_public(addresses: list[IPAddress]) -> tuple[IPAddress, str] | None:
    """The first of `addresses` that is not public, with what kind it is; None if all are."""
    for address in addresses:
        kind = non_public_kind(address)
        if kind is not None:
            return address, kind
    return None


def _refusal(url: str) -> str | None:
    """Why `url` is refused (scheme, shape or addresses), or None. Raises socket.gaierror."""
    try:
        host, port = _split(url)
        literal = _literal(host)
        addresses = [literal] if literal is not None else _resolve(host, port)
    except ForbiddenURL as exc:
        return str(exc)
    refused = _first_non_public(addresses)
    if refused is None:
        return None
    address, kind = refused
    if literal is not None:
        return f"{_shown(address)} is {kind}"
    return f"{host} resolves to {_shown(address)}, {kind}"


def is_public_url(url: str) -> tuple[bool, str]:
    """(True, "") if `url` is http(s) and every address its host resolves to is public.

    Otherwise (False, reason). Ignores `SWITCHYARD_ALLOW_PRIVATE_URLS`: it answers the question
    its name asks. A host that does not resolve is (False, "cannot resolve ...").
    """
    try:
        reason = _refusal(url)
    except OSError as exc:
        return False, f"cannot resolve the host of {redact_url(url)!r}: {exc}"
    return (False, reason) if reason else (True, "")


def private_urls_allowed() -> bool:
    return bool(getattr(settings, "SWITCHYARD_ALLOW_PRIVATE_URLS", False))


def check_outbound_url(url: str) -> None:
    """Raise ForbiddenURL unless `url` may be requested on a tenant's behalf.

    The scheme must be http or https even when `SWITCHYARD_ALLOW_PRIVATE_URLS` is on; the
    setting only lifts the address check (for local development and tests). A host that does
    not resolve raises `socket.gaierror` (an OSError): that is worth retrying, not a refusal.
    """
    if private_urls_allowed():
        _split(url)
        return
    reason = _refusal(url)
    if reason:
        raise ForbiddenURL(f"refusing {redact_url(url)}: {reason}")


def check_public_url(url: str) -> None:
    """`check_outbound_url` for step handlers: refusals fail the step without retrying."""
    try:
        check_outbound_url(url)
    except ForbiddenURL as exc:
        raise StepFailure(str(exc), code="forbidden_address", retryable=False) from None
    except OSError as exc:
        raise StepFailure(
            f"cannot resolve the host of {redact_url(url)}: {exc}",
            code="http_error",
            retryable=True,
        ) from None


class _GuardedBackend(httpcore.SyncBackend):
    """Connects only to addresses it has checked: one lookup, every answer public, then a
    connection to one of those answers (no second lookup a rebinding DNS could answer)."""

    def connect_tcp(self, host: str, port: int, timeout: float | None = None, **kwargs: Any):
        if private_urls_allowed():
            return super().connect_tcp(host, port, timeout, **kwargs)
        literal = _literal(host.strip("[]"))
        try:
            addresses = [literal] if literal is not None else _resolve(host, port)
        except OSError as exc:
            raise httpcore.ConnectError(f"cannot resolve {host}: {exc}") from exc
        refused = _first_non_public(addresses)
        if refused is not None:
            address, kind = refused
            raise ForbiddenURL(f"refusing to connect to {host}: {_shown(address)} is {kind}")
        error: Exception = httpcore.ConnectError(f"no address for {host}")
        for address in addresses:
            try:
                return super().connect_tcp(str(address), port, timeout, **kwargs)
            except httpcore.ConnectError as exc:
                error = exc
        raise error


class _GuardedTransport(httpx.HTTPTransport):
    def __init__(self) -> None:
        super().__init__()
        self._pool = httpcore.ConnectionPool(
            ssl_context=httpx.create_ssl_context(), network_backend=_GuardedBackend()
        )


def guarded_client(**kwargs: Any) -> httpx.Client:
    """An httpx client for requests a tenant aims (the `http` tool, webhooks): it connects only
    to public addresses, checked at connection time (`ForbiddenURL` otherwise), and follows no
    redirect."""
    return httpx.Client(transport=_GuardedTransport(), follow_redirects=False, **kwargs)
