"""A request's priority class from a header that a trusted gateway sets:
``priority=priority_from_header("x-priority")``."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import re
import threading
from collections.abc import Iterable

from starlette.requests import HTTPConnection

from ._logging import logger
from ._priority import Priority

#: Peers trusted by default: this machine only (as uvicorn's
#: ``forwarded_allow_ips``), i.e. a gateway on the same host.
LOOPBACK = ("127.0.0.1", "::1")
# Distinct unknown header values logged (one WARNING each) before the rest
# go unlogged: a misconfigured gateway shows, a flood does not.
_MAX_LOGGED_VALUES = 10
# Peers and values remembered per header (a cache, cleared when full).
_CACHE_SIZE = 1024
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # an HTTP header name (RFC 9110)
# A secret header's value: visible ASCII only, so that what the gateway sends
# is byte for byte what the app compares (servers strip spaces at the ends,
# and no other encoding survives every proxy).
_SECRET = re.compile(r"[\x21-\x7e]+")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class HeaderPriority:
    """``priority_from_header(...)``: a ``priority=`` function (for routes,
    dependencies, the ASGI wrapper and WebSocket routes) that reads the
    class from a header, but only from trusted peers."""

    __slots__ = (
        "header",
        "default",
        "_networks",
        "_everyone",
        "_peers",
        "_values",
        "_lock",
        "_unknown_logged",
        "_untrusted_logged",
        "_secret",
        "_unsigned_logged",
    )

    def __init__(
        self,
        header: str,
        default: Priority,
        trusted: str | Iterable[str],
        secret: tuple[str, bytes] | None = None,
    ) -> None:
        self.header = header
        self.default = default
        self._secret = secret
        self._unsigned_logged = False
        self._everyone, self._networks = _networks(trusted)
        self._peers: dict[str | None, bool] = {}
        self._values: dict[str, Priority] = {}
        self._lock = threading.Lock()  # for the log-once state (sync routes run in threads)
        self._unknown_logged: set[str] = set()
        self._untrusted_logged = False

    def __call__(self, connection: HTTPConnection) -> Priority:
        value = connection.headers.get(self.header)
        if value is None:
            return self.default
        client = connection.scope.get("client")
        peer = client[0] if client else None
        trusted = self._peers.get(peer)
        if trusted is None:
            trusted = self._trusts(peer)
        if not trusted:
            self._ignored(peer)
            return self.default
        if self._secret is not None:
            sent = connection.headers.get(self._secret[0])
            # Digests of both: constant time whatever the lengths.
            if sent is None or not hmac.compare_digest(
                hashlib.sha256(sent.encode("latin-1", "replace")).digest(), self._secret[1]
            ):
                self._unsigned()
                return self.default
        found = self._values.get(value)
        if found is not None:
            return found
        number = value.strip()
        try:
            found = Priority.parse(int(number) if number.isascii() and number.isdigit() else value)
        except ValueError:
            self._unknown(value)
            return self.default
        if len(self._values) >= _CACHE_SIZE:
            self._values.clear()
        self._values[value] = found
        return found

    def _trusts(self, peer: str | None) -> bool:
        if self._everyone:
            trusted = True
        elif peer is None:  # a Unix socket, or a server that names no peer
            trusted = False
        else:
            try:
                address = ipaddress.ip_address(peer)
            except ValueError:
                trusted = False
            else:
                # A dual-stack listener shows IPv4 peers as ::ffff:a.b.c.d.
                mapped = getattr(address, "ipv4_mapped", None)
                if mapped is not None:
                    address = mapped
                trusted = any(address in network for network in self._networks)
        if len(self._peers) >= _CACHE_SIZE:
            self._peers.clear()
        self._peers[peer] = trusted
        return trusted

    def _ignored(self, peer: str | None) -> None:
        if self._untrusted_logged:
            return
        with self._lock:
            if self._untrusted_logged:
                return
            self._untrusted_logged = True
        logger.warning(
            "priority header %r ignored: sent by %s, not a trusted peer; its requests get the "
            "default class %s (logged once). If your gateway sets the header, the peer must be "
            "the gateway: a server that takes the client address from X-Forwarded-For (uvicorn "
            "does for a gateway on this machine, by default) shows the client instead; then "
            "use priority_from_header(trusted='*', secret=...), never the client's address",
            self.header,
            repr(peer) if peer is not None else "a peer without an address",
            self.default.name,
            extra={"header": self.header, "peer": peer},
        )

    def _unsigned(self) -> None:
        if self._unsigned_logged:
            return
        with self._lock:
            if self._unsigned_logged:
                return
            self._unsigned_logged = True
        assert self._secret is not None
        logger.warning(
            "priority header %r ignored: the request does not carry the gateway's secret in "
            "%r; its requests get the default class %s (logged once)",
            self.header,
            self._secret[0],
            self.default.name,
            extra={"header": self.header},
        )

    def _unknown(self, value: str) -> None:
        with self._lock:
            if value in self._unknown_logged or len(self._unknown_logged) >= _MAX_LOGGED_VALUES:
                return
            self._unknown_logged.add(value)
            last = len(self._unknown_logged) == _MAX_LOGGED_VALUES
        logger.warning(
            "priority header %r: unknown value %r, the request gets the default class %s "
            "(known: %s; logged once per value%s)",
            self.header,
            value[:100],
            self.default.name,
            ", ".join(p.name for p in Priority),
            f", and no more after {_MAX_LOGGED_VALUES} values" if last else "",
            extra={"header": self.header, "value": value[:100]},
        )

    def __repr__(self) -> str:
        return f"priority_from_header({self.header!r}, default=Priority.{self.default.name})"


def priority_from_header(
    name: str,
    *,
    default: Priority | str = Priority.CRITICAL,
    trusted: str | Iterable[str] = LOOPBACK,
    secret: tuple[str, str] | None = None,
) -> HeaderPriority:
    """A ``priority=`` function that reads each request's class from the
    header ``name`` (a class name in any case, ``-`` or ``_``, or its
    number 0..3), set by your gateway::

        @app.get("/messages")
        @limiter.resources([db], priority=priority_from_header("x-priority"))
        async def read_messages(): ...

    The header is honoured only from a trusted peer, the address the
    server gives as the connection's client (``request.client.host``):
    ``trusted`` is a list of addresses and networks (``"10.0.0.0/8"``), or
    a comma-separated string of them, or ``"*"`` for every peer; by default
    this machine only (``127.0.0.1`` and ``::1``, as uvicorn's
    ``forwarded_allow_ips``). A request without the header, from another
    peer (the first such is logged at WARNING), or with a value that is no
    class (each distinct value logged once at WARNING) gets ``default``.

    ``secret``: ``(header, value)``, a second header that your gateway sets
    to a value only it and the app know (e.g. from an environment
    variable; visible ASCII, no spaces); the class header is then honoured
    only on requests that carry it (compared in constant time), from peers
    that ``trusted`` admits as before: pass ``trusted="*"`` wherever the
    peer address cannot tell the gateway from a client (below).

    Your gateway must set the header on every request, overwriting what a
    client sent: any client that can reach a trusted peer's listener
    chooses its own class otherwise. The peer is the address the server
    reports, which is not always the gateway's: a server that takes the
    client address from ``X-Forwarded-For`` (uvicorn does for a gateway on
    this machine, by default: ``proxy_headers`` on, ``forwarded_allow_ips``
    loopback) reports the client, so the header of a gateway that adds
    ``X-Forwarded-For`` is ignored; and with ``--forwarded-allow-ips='*'``
    any client can claim to be ``127.0.0.1``. In both cases use
    ``secret``, or run the server without proxy headers.

    ValueError naming the parameter for a bad ``name``, ``default``,
    ``trusted`` or ``secret``.
    """
    if not isinstance(name, str) or not _TOKEN.fullmatch(name):
        raise ValueError(f"name must be an HTTP header name such as 'x-priority', got {name!r}")
    signed: tuple[str, bytes] | None = None
    if secret is not None:
        if (
            not isinstance(secret, tuple)
            or len(secret) != 2
            or not isinstance(secret[0], str)
            or not _TOKEN.fullmatch(secret[0])
            or not isinstance(secret[1], str)
            or not _SECRET.fullmatch(secret[1])
        ):
            raise ValueError(
                "secret must be (header name, value of visible ASCII characters, no spaces), "
                "such as ('x-gateway-secret', os.environ['GATEWAY_SECRET']), got "
                f"{type(secret).__name__} (the value is not shown)"
            )
        signed = (secret[0].lower(), hashlib.sha256(secret[1].encode("ascii")).digest())
    return HeaderPriority(name.lower(), Priority.parse(default, name="default"), trusted, signed)


def _networks(trusted: object) -> tuple[bool, tuple[Network, ...]]:
    wanted = (
        "trusted must be addresses or networks ('10.0.0.0/8'), as a list or a "
        "comma-separated str, or '*' for every peer"
    )
    if isinstance(trusted, str):
        items: list[object] = [item.strip() for item in trusted.split(",")]
    elif isinstance(trusted, Iterable) and not isinstance(trusted, (bytes, bytearray)):
        items = list(trusted)
    else:
        raise TypeError(f"{wanted}, got {type(trusted).__name__} {trusted!r}")
    if not items:
        raise ValueError(f"{wanted}, got none")
    networks: list[Network] = []
    for item in items:
        if item == "*":
            return True, ()
        if not isinstance(item, str):
            raise TypeError(f"{wanted}, got {type(item).__name__} {item!r}")
        try:
            networks.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise ValueError(f"{wanted}, got {item!r}") from None
    return False, tuple(networks)
