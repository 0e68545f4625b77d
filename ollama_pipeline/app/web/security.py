"""Request guards of the web UI, as one pure ASGI middleware: Host check, access token, CSRF, headers.

* **Host check** (no token configured, so the UI is bound to loopback): only requests whose Host header
  is well formed (host and optional port, nothing else) and names a loopback address or `localhost` are
  served, which defeats DNS rebinding; `localhost:80@evil.example` is malformed and refused.
* **Access token** (`pipeline.web_token` set, required for any non-loopback bind): every request must carry
  it as the `op_token` cookie, an `Authorization: Bearer` / `X-Auth-Token` header, or `?token=`. A GET with
  a correct `?token=` is redirected to the same URL without it and the cookie is set, so the token does
  not linger in the address bar, history or Referer headers. Compared in constant time.
* **CSRF** (double submit): every response that finds no `op_csrf` cookie sets a fresh random one; every
  form carries the same value as the hidden field `csrf_token`. A POST/PUT/PATCH/DELETE is refused (403)
  unless the field (or an `X-CSRF-Token` header) equals the cookie, and, when an `Origin` or `Referer`
  header is present, unless its host:port equals the request's Host. The body is buffered (at most
  `MAX_FORM_BYTES`) to read the field and handed on unchanged, so every unsafe route is covered without
  each route having to remember it.
* **Headers**: a strict Content-Security-Policy (no scripts at all), nosniff, no framing, same-origin
  Referer.
"""

from __future__ import annotations

import hmac
import html
import ipaddress
import re
import secrets
from collections.abc import Iterable
from http.cookies import SimpleCookie
from urllib.parse import parse_qs, urlencode, urlsplit

from starlette.datastructures import URL
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

CSRF_COOKIE = "op_csrf"
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "x-csrf-token"
TOKEN_COOKIE = "op_token"
TOKEN_PARAM = "token"
SCOPE_KEY = "ollama_web.csrf"
MAX_FORM_BYTES = 64 * 1024
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
SECURITY_HEADERS: tuple[tuple[str, str], ...] = (
    ("content-security-policy", "default-src 'none'; img-src 'self'; style-src 'self'; form-action 'self'; "
                                "frame-ancestors 'none'; base-uri 'none'"),
    ("x-content-type-options", "nosniff"),
    ("x-frame-options", "DENY"),
    ("referrer-policy", "same-origin"),
)


def is_loopback_host(host: str) -> bool:
    """True for `localhost` and loopback IP addresses (127.0.0.0/8, ::1), with or without brackets."""
    name = host.strip().strip("[]").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


# RFC 9110 Host = uri-host [":" port]; uri-host is a bracketed IPv6 literal or a reg-name/IPv4 (letters,
# digits, "-", "."). Anything else (userinfo "@", "/", spaces, a second ":") is not a Host value at all.
_HOST_VALUE = re.compile(r"(?:\[(?P<ip6>[0-9a-f:.]+)\]|(?P<name>[a-z0-9.-]+))(?::(?P<port>[0-9]{1,5}))?")


def _host_name(host_header: str) -> str | None:
    """The host part of a well-formed Host header value (`[::1]:8080` -> `::1`, `a:80` -> `a`), else None.

    `localhost:80@evil.example` and the like are malformed (None), never read as `localhost`.
    """
    match = _HOST_VALUE.fullmatch(host_header.strip().lower())
    if match is None:
        return None
    return match.group("ip6") or match.group("name")


def _valid_token_shape(value: str | None) -> bool:
    return bool(value) and 20 <= len(value or "") <= 200 and all(c.isalnum() or c in "-_" for c in value or "")


def csrf_token_of(scope: Scope) -> str:
    """The CSRF token of this request (from its cookie, or the fresh one the response will set)."""
    return str(scope.get(SCOPE_KEY, ""))


def _error(status: int, title: str, message: str) -> HTMLResponse:
    body = (f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{html.escape(title)}</title>"
            f"<link rel=stylesheet href=/static/style.css></head><body><main class=message>"
            f"<h1>{html.escape(title)}</h1><p class=error>{html.escape(message)}</p></main></body></html>")
    return HTMLResponse(body, status_code=status)


def _token_form() -> HTMLResponse:
    body = ("<!doctype html><html lang=en><head><meta charset=utf-8><title>Token required</title>"
            "<link rel=stylesheet href=/static/style.css></head><body><main class=message>"
            "<h1>Token required</h1><p class=error>This web UI needs its access token (pipeline.web_token).</p>"
            "<form method=get action=/><label>Token <input type=password name=token autocomplete=off>"
            "</label> <button type=submit>Open</button></form></main></body></html>")
    return HTMLResponse(body, status_code=401)


class SecurityMiddleware:
    """Host check, access token, double-submit CSRF and security headers for every HTTP request."""

    def __init__(self, app: ASGIApp, *, token: str | None = None, allowed_hosts: Iterable[str] = (),
                 secure_cookies: bool = False) -> None:
        self.app = app
        self.token = token or None
        self.allowed_hosts = {h.lower() for h in allowed_hosts}
        self.secure_cookies = secure_cookies

    # -- helpers ---------------------------------------------------------------------------------

    def _cookie(self, name: str, value: str, *, max_age: int | None = None) -> str:
        morsel = f"{name}={value}; Path=/; HttpOnly; SameSite=Strict"
        if max_age is not None:
            morsel += f"; Max-Age={max_age}"
        return morsel + ("; Secure" if self.secure_cookies else "")

    def _host_allowed(self, host_header: str) -> bool:
        if self.token is not None:
            return True
        name = _host_name(host_header)
        if name is None:
            return False
        return is_loopback_host(name) or name in self.allowed_hosts or host_header.strip().lower() in self.allowed_hosts

    def _token_matches(self, supplied: str | None) -> bool:
        if self.token is None or not supplied:
            return False
        return hmac.compare_digest(supplied.encode("utf-8"), self.token.encode("utf-8"))

    @staticmethod
    def _origin_ok(headers: dict[str, str], host_header: str) -> bool:
        for name in ("origin", "referer"):
            value = headers.get(name)
            if value is None:
                continue
            if value.strip().lower() == "null":
                return False
            parts = urlsplit(value)
            return bool(parts.netloc) and parts.netloc.lower() == host_header.lower()
        return True

    # -- the ASGI entry point ------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        cookies: dict[str, str] = {}
        if "cookie" in headers:
            jar: SimpleCookie = SimpleCookie()
            try:
                jar.load(headers["cookie"])
            except Exception:  # a malformed Cookie header counts as no cookies
                jar = SimpleCookie()
            cookies = {k: m.value for k, m in jar.items()}
        host_header = headers.get("host", "")
        method = scope["method"].upper()
        extra_headers: list[tuple[bytes, bytes]] = []

        if not self._host_allowed(host_header):
            await self._finish(_error(400, "Bad request", "Unexpected Host header: this UI answers only on "
                                      "loopback names (127.0.0.1, localhost, ::1)."), scope, receive, send)
            return

        if self.token is not None:
            query = parse_qs(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)
            from_query = (query.get(TOKEN_PARAM) or [None])[0]
            bearer = headers.get("authorization", "")
            from_header = bearer[7:].strip() if bearer.lower().startswith("bearer ") else headers.get("x-auth-token")
            if self._token_matches(from_query) and method in SAFE_METHODS:
                rest = [(k, v) for k, vs in query.items() if k != TOKEN_PARAM for v in vs]
                target = URL(scope=scope).path + (f"?{urlencode(rest)}" if rest else "")
                response = RedirectResponse(target, status_code=303)
                response.headers.append("set-cookie", self._cookie(TOKEN_COOKIE, self.token))
                await self._finish(response, scope, receive, send)
                return
            if not any(self._token_matches(v) for v in (cookies.get(TOKEN_COOKIE), from_header, from_query)):
                await self._finish(_token_form(), scope, receive, send)
                return

        csrf = cookies.get(CSRF_COOKIE)
        if not _valid_token_shape(csrf):
            csrf = secrets.token_urlsafe(32)
            extra_headers.append((b"set-cookie", self._cookie(CSRF_COOKIE, csrf).encode("latin-1")))
        scope[SCOPE_KEY] = csrf

        if method not in SAFE_METHODS:
            problem, receive = await self._check_csrf(scope, receive, headers, cookies.get(CSRF_COOKIE), host_header)
            if problem is not None:
                await self._finish(_error(403, "Forbidden", problem), scope, receive, send, extra_headers)
                return

        await self.app(scope, receive, self._sender(send, extra_headers))

    async def _check_csrf(self, scope: Scope, receive: Receive, headers: dict[str, str], cookie: str | None,
                          host_header: str) -> tuple[str | None, Receive]:
        """(reason for refusing or None, a receive callable that replays the buffered body)."""
        chunks: list[bytes] = []
        size = 0
        more = True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > MAX_FORM_BYTES:
                return "Request body too large for a form.", receive
            chunks.append(chunk)
            more = bool(message.get("more_body", False))
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        if not self._origin_ok(headers, host_header):
            return "Cross-origin form submission refused (Origin/Referer does not match this host).", replay
        if not _valid_token_shape(cookie):
            return "Missing CSRF cookie: reload the page and submit the form again.", replay
        supplied = headers.get(CSRF_HEADER)
        if supplied is None and headers.get("content-type", "").split(";")[0].strip().lower() == \
                "application/x-www-form-urlencoded":
            fields = parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True)
            supplied = (fields.get(CSRF_FIELD) or [None])[0]
        if not supplied or not hmac.compare_digest(supplied.encode("utf-8"), str(cookie).encode("utf-8")):
            return "Missing or wrong CSRF token: reload the page and submit the form again.", replay
        return None, replay

    def _sender(self, send: Send, extra_headers: list[tuple[bytes, bytes]]) -> Send:
        async def wrapped(message: Message) -> None:
            if message["type"] == "http.response.start":
                present = {k.lower() for k, _ in message.get("headers", [])}
                added = [(k.encode(), v.encode()) for k, v in SECURITY_HEADERS if k.encode() not in present]
                message = {**message, "headers": list(message.get("headers", [])) + added + extra_headers}
            await send(message)

        return wrapped

    async def _finish(self, response: Response, scope: Scope, receive: Receive, send: Send,
                      extra_headers: list[tuple[bytes, bytes]] | None = None) -> None:
        await response(scope, receive, self._sender(send, extra_headers or []))

