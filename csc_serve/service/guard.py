"""ASGI middleware in front of the service's endpoints: auth, body size, content types, one-line errors, and the
error answers in the OpenAPI document.

- Bearer token: when ``CSC_SERVE_TOKEN`` is set, every ``POST`` needs ``Authorization: Bearer <token>``
  (401 otherwise); probes, ``/metrics`` and the docs stay open.
- Body size: a declared ``Content-Length`` beyond the cap is refused at once, a streamed body as soon as it
  passes the cap (413); nothing is parsed first. A body that has not arrived after a minute gets 408.
- Content types and bodies: checked against the endpoint's ``Route`` before BentoML sees them
  (``csc_serve.service.bodies``): 415 for a wrong content type, 400 or 413 for a malformed or oversized form.
- Errors: every error answer of a guarded route is JSON with a one-line ``error`` (BentoML's 400 for a failed
  field validation lists pydantic's details; they go on one line, "sigma: Input should be less than or equal
  to 255", and stay in ``detail``). Filesystem paths in them read ``<hidden>`` unless ``show_paths`` is set.
- ``/docs.json`` is rewritten on its way out to list every status each endpoint can answer
  (``csc_serve.service.openapi``).

``use_cancelled_timeouts`` replaces BentoML's request timeout middleware with one that cancels its timer
when the request ends. BentoML 1.4's leaves the timer scheduled for the whole timeout, and the timer holds
the request's context (its tracing span and everything attached to it): under load the worker's memory
grew by the requests of the last ``traffic.timeout`` seconds (measured: 7 KB a request, +8 % in 90 s).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from http import HTTPStatus

from csc_serve.service.bodies import BODY_TIMEOUT_S, Route, check_body
from csc_serve.service.openapi import document
from csc_serve.service.settings import ServeSettings

Scope = dict
Receive = Callable[[], Awaitable[dict]]
Send = Callable[[dict], Awaitable[None]]
OPEN_PATHS = ("/livez", "/readyz", "/healthz", "/metrics")
DOCS_PATH = "/docs.json"
logger = logging.getLogger("csc_serve")


class RequestGuard:
    """``settings``: the serving settings, or a callable that reads them when the app is built;
    ``routes``: path -> ``Route`` of every endpoint."""

    def __init__(self, app, *, settings: ServeSettings | Callable[[], ServeSettings], routes: Mapping[str, Route]):
        settings = settings if isinstance(settings, ServeSettings) else settings()
        self.app, self.settings, self.routes = app, settings, dict(routes)
        self.token, self.max_body_bytes = settings.token, settings.max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if scope["method"] != "POST" or scope["path"] in OPEN_PATHS:
            if scope["method"] == "GET" and scope["path"] == DOCS_PATH:
                return await self.app(scope, receive, _rewritten(send, self.document))
            return await self.app(scope, receive, send)
        errors = _rewritten(send, self._error_body, statuses=range(400, 600))
        headers = [(k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in scope.get("headers", [])]
        named = dict(headers)
        if self.token is not None and not self._authorized(named.get("authorization", "")):
            return await self._reject(send, 401, "missing or wrong bearer token (Authorization: Bearer <token>)",
                                      {"www-authenticate": "Bearer"})
        declared = named.get("content-length")
        if declared is not None and not (declared.isascii() and declared.isdigit()):
            return await self._reject(send, 400, f"Content-Length {declared!r} is not a number of bytes")
        if declared is not None and int(declared) > self.max_body_bytes:
            return await self._reject(send, 413, f"request body of {declared} bytes exceeds the cap of "
                                                 f"{self.max_body_bytes} bytes")
        try:  # a streamed body is counted as it comes, and must come in time
            body = await asyncio.wait_for(_read_body(receive, self.max_body_bytes), BODY_TIMEOUT_S)
        except asyncio.TimeoutError:
            return await self._reject(send, 408, f"the request body did not arrive within {BODY_TIMEOUT_S} s")
        if body is None:
            return await self._reject(send, 413, f"request body exceeds the cap of {self.max_body_bytes} bytes")
        route = self.routes.get(scope["path"])
        if route is not None:
            content_types = [value for key, value in headers if key == "content-type"]
            if len(content_types) > 1:
                return await self._reject(send, 400, "more than one Content-Type header")
            content_type = content_types[0] if content_types else ""
            problem = check_body(content_type, body, route)
            if problem is not None:
                return await self._reject(send, *problem)
            scope = _with_content_type(scope, content_type)
        started = False

        async def watched(message: dict) -> None:
            nonlocal started
            started = True
            await errors(message)

        try:
            await self.app(scope, _replay(body, receive), watched)
        except Exception:
            if started:
                raise
            logger.exception("%s %s failed", scope["method"], scope["path"])
            await _send_error(send, 500, "an unexpected error; the server log has the details")

    def _authorized(self, header: str) -> bool:
        scheme, _, credentials = header.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(credentials.strip().encode(), self.token.encode())

    async def _reject(self, send: Send, status: int, reason: str, headers: Mapping[str, str] | None = None) -> None:
        from csc_serve.service.metrics import metrics

        metrics().rejected.labels(status=str(status)).inc()
        await _send_error(send, status, reason, headers)

    def _error_body(self, body: bytes, status: int) -> bytes:
        """Any error answer as ``{"error": one line[, "detail": pydantic's list]}``, paths hidden."""
        from csc_serve.service.metadata import hide_paths

        try:
            data = json.loads(body)
        except ValueError:
            data = body.decode("utf-8", "replace")
        if isinstance(data, list) and len(data) == 1 and isinstance(data[0], dict):
            data = data[0]  # BentoML wraps the errors of its exceptions in a list
        if not isinstance(data, dict):
            data = {"error": data if isinstance(data, str) else json.dumps(data)}
        detail = data.get("detail")
        if isinstance(detail, list) and detail and all(isinstance(item, dict) for item in detail):
            reasons = [f"{'.'.join(str(part) for part in item.get('loc', ())) or 'input'}: "
                       f"{item.get('msg', 'invalid')}" for item in detail]
            data = {"error": "; ".join(reasons), "detail": detail}
        else:
            error = data.get("error") or detail or _phrase(status)
            data = {"error": error if isinstance(error, str) else json.dumps(error)}
        data["error"] = " ".join(data["error"].split()) or _phrase(status)
        if not self.settings.show_paths:
            data = hide_paths(data)
        return json.dumps(data).encode()

    # ----------------------------------------------------------------------------- the OpenAPI document
    def document(self, body: bytes, status: int) -> bytes:
        if status != 200:
            return body
        spec = json.loads(body)
        return json.dumps(document(spec, self.routes, self.settings)).encode()


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return f"HTTP {status}"



def _with_content_type(scope: Scope, content_type: str) -> Scope:
    """``scope`` with its media type in lower case: BentoML picks its parser by the exact string."""
    kind, sep, rest = content_type.partition(";")
    if kind == kind.strip().lower():
        return scope
    value = (kind.strip().lower() + sep + rest).encode("latin-1")
    headers = [(k, value if k.lower() == b"content-type" else v) for k, v in scope.get("headers", [])]
    return {**scope, "headers": headers}


# ----------------------------------------------------------------------------- bodies in and out
async def _send_error(send: Send, status: int, reason: str, headers: Mapping[str, str] | None = None) -> None:
    body = json.dumps({"error": reason}).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


async def _read_body(receive: Receive, limit: int) -> bytes | None:
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # the disconnect, when it comes

    return replay


def _rewritten(send: Send, rewrite: Callable[[bytes, int], bytes], statuses=(200,)) -> Send:
    """``send`` with the body of answers of the given statuses replaced by ``rewrite(body, status)`` (as JSON)."""
    held: dict = {}

    async def wrapped(message: dict) -> None:
        if message["type"] == "http.response.start" and message["status"] in statuses:
            held["start"], held["body"] = message, b""
            return
        if "start" not in held:
            return await send(message)
        held["body"] += message.get("body", b"")
        if message.get("more_body", False):
            return
        start = held.pop("start")
        body = rewrite(held.pop("body"), start["status"])
        headers = [(k, v) for k, v in start.get("headers", []) if k.lower() not in (b"content-length", b"content-type")]
        headers += [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({**start, "headers": headers})
        await send({"type": "http.response.body", "body": body, "more_body": False})

    return wrapped


# ----------------------------------------------------------------------------- request timeouts
def use_cancelled_timeouts() -> None:
    """Have BentoML build its apps with ``CancelledTimeout`` in place of its own ``TimeoutMiddleware``
    (looked up by name when the app's middleware list is built)."""
    from bentoml._internal.server.http import traffic

    if not issubclass(traffic.TimeoutMiddleware, CancelledTimeout):
        traffic.TimeoutMiddleware = type("TimeoutMiddleware", (CancelledTimeout, traffic.TimeoutMiddleware), {})


class CancelledTimeout:
    """A 504 when no response has started within ``timeout`` seconds; the timer goes with the request."""

    def __init__(self, app, timeout: float) -> None:
        self.app, self.timeout = app, timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        loop = asyncio.get_running_loop()
        started = loop.create_future()

        async def watched(message: dict) -> None:
            if not started.done():
                started.set_result(None)
            await send(message)

        task = asyncio.ensure_future(self.app(scope, receive, watched))
        timer = loop.call_later(self.timeout, lambda: started.done() or started.set_exception(asyncio.TimeoutError))
        try:
            await asyncio.wait([started, task], return_when=asyncio.FIRST_COMPLETED)
        finally:
            timer.cancel()
        if started.done() and started.exception() is not None and task.cancel():
            body = json.dumps({"error": f"not able to process the request in {self.timeout:g} seconds"}).encode()
            await send({"type": "http.response.start", "status": 504, "headers": [
                (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})
            return
        await task
