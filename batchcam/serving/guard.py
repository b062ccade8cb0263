"""``batchcam serve``'s guard against other web pages: requests must name this server in their Host
header (a DNS-rebinding page names its own), and a request to the API that carries an Origin
header must come from this server's own page (HTTP 403 otherwise)."""
from __future__ import annotations

import ipaddress
import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the serve extra's package, imported when serve runs
    from starlette.types import ASGIApp, Receive, Scope, Send

SAFE_METHODS = ("GET", "HEAD")
# A Host header (or an Origin's authority): a bracketed IPv6 address or a name/IPv4 address, and a port.
HOST_PATTERN = re.compile(r"(\[[0-9a-f:.]+\]|[a-z0-9.-]+)(?::([0-9]{1,5}))?")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


# --- Host and Origin ---------------------------------------------------------------------------


def _host_name(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    return f"[{address}]" if address.version == 6 else str(address)


def _is_address(name: str) -> bool:
    try:
        ipaddress.ip_address(name.strip("[]"))
    except ValueError:
        return False
    return True


def _shown(value: str) -> str:
    """A header value quoted for an error message, cut short."""
    return repr(value[:100])


def allowed_hosts_for(host: str, port: int) -> tuple[str, ...]:
    """The ``host:port`` values a server bound to ``host``:``port`` answers to.

    The bound address itself; ``localhost`` too when that is a loopback address (and 127.0.0.1 and
    [::1] when it is ``localhost``); for a wildcard bind (0.0.0.0, ::) any IP address and
    ``localhost``, written ``*``: a DNS-rebinding page can only send its own *name* as Host, never an
    address. Port 0 (the system picks one) is written ``*`` too.
    """
    port_text = str(port) if port else "*"
    name = host.strip().lower()
    try:
        address = ipaddress.ip_address(name.strip("[]"))
    except ValueError:
        address = None
    if address is not None and address.is_unspecified:
        names = ["*", "localhost"]
    else:
        names = [_host_name(address) if address is not None else name]
        if is_loopback(host):
            names.append("localhost")
        if name == "localhost":
            names += ["127.0.0.1", "[::1]"]
    return tuple(dict.fromkeys(f"{entry}:{port_text}" for entry in names))


def split_host(value: str) -> tuple[str, int] | None:
    """(name, port) of a Host header, the address normalised and the port 80 when left out; None
    when it is not one."""
    match = HOST_PATTERN.fullmatch(value.lower())
    if match is None:
        return None
    name, port = match.group(1), int(match.group(2) or 80)
    try:
        name = _host_name(ipaddress.ip_address(name.strip("[]")))
    except ValueError:
        if name.startswith("["):
            return None
    return name, port


def host_allowed(value: str, allowed: tuple[str, ...]) -> bool:
    """Whether a Host header value names this server (``allowed`` as from ``allowed_hosts_for``)."""
    parsed = split_host(value)
    if parsed is None:
        return False
    name, port = parsed
    for entry in allowed:
        entry_name, _, entry_port = entry.lower().rpartition(":")
        if entry_port not in ("*", str(port)):
            continue
        if entry_name == "*" and _is_address(name) or (split_host(entry_name) or ("",))[0] == name:
            return True
    return False


def origin_allowed(origin: str, allowed: tuple[str, ...]) -> bool:
    """Whether an Origin header is this server's own page: ``http://`` and an allowed host, no path."""
    return origin.startswith("http://") and host_allowed(origin[len("http://"):], allowed)


def request_refusal(scope: Scope, allowed: tuple[str, ...]) -> str | None:
    """Why a request is refused (403), or None: a Host that is not this server's, or a cross-origin
    call of the API (or of any method but GET and HEAD)."""
    headers = scope.get("headers") or []
    hosts = [value.decode("latin-1") for key, value in headers if key == b"host"]
    if len(hosts) != 1 or not host_allowed(hosts[0], allowed):
        shown = _shown(hosts[0]) if len(hosts) == 1 else f"({len(hosts)} Host headers)"
        expected = " or ".join(entry.replace("*:", "<any IP address>:").replace(":*", ":<port>") for entry in allowed)
        return f"refused: Host {shown} is not this server's address (expected {expected}); open the page there"
    origins = [value.decode("latin-1") for key, value in headers if key == b"origin"]
    api = scope.get("path", "").startswith("/api/") or scope.get("method") not in SAFE_METHODS
    if origins and api and (len(origins) != 1 or not origin_allowed(origins[0], allowed)):
        return (f"cross-origin request refused: Origin {_shown(origins[0])} is not this server; only its own page "
                "may call the API")
    return None


class RequestGuard:
    """ASGI middleware: every HTTP request passes ``request_refusal`` or gets 403 with a JSON reason."""

    def __init__(self, app: ASGIApp, allowed_hosts: tuple[str, ...]):
        self.app, self.allowed_hosts = app, tuple(allowed_hosts)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            reason = request_refusal(scope, self.allowed_hosts)
            if reason is not None:
                from fastapi.responses import JSONResponse

                await JSONResponse({"detail": reason}, status_code=403)(scope, receive, send)
                return
        await self.app(scope, receive, send)
