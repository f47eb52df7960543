"""ASGI middleware in front of the service's endpoints: auth, body size, upload fields, one-line errors.

- Bearer token: when ``CSC_SERVE_TOKEN`` is set, every ``POST`` needs ``Authorization: Bearer <token>``
  (401 otherwise); probes, ``/metrics`` and the docs stay open.
- Body size: a declared ``Content-Length`` beyond the cap is refused at once, a streamed body as soon as it
  passes the cap (413); nothing is parsed first. A body that has not arrived after a minute gets 408.
- Uploads: the endpoints that take files take ``multipart/form-data`` only (415 otherwise); each file
  field must be an uploaded file part, and no other field may be one. BentoML would download a URL given
  as a plain form value in a file field (and fail on binary data in a plain field); here such requests are
  refused (400) before BentoML sees them, so no URL is ever fetched.
- Errors: BentoML's 400 for a failed field validation lists pydantic's details; the middleware puts them
  on one line in ``error`` ("sigma: Input should be less than or equal to 255").

``use_cancelled_timeouts`` replaces BentoML's request timeout middleware with one that cancels its timer
when the request ends. BentoML 1.4's leaves the timer scheduled for the whole timeout, and the timer holds
the request's context (its tracing span and everything attached to it): under load the worker's memory
grew by the requests of the last ``traffic.timeout`` seconds (measured: 7 KB a request, +8 % in 90 s).
"""

from __future__ import annotations

import asyncio
import hmac
import json
from collections.abc import Awaitable, Callable, Mapping

from python_multipart.multipart import parse_options_header

from csc_serve.service.settings import ServeSettings

Scope = dict
Receive = Callable[[], Awaitable[dict]]
Send = Callable[[dict], Awaitable[None]]
OPEN_PATHS = ("/livez", "/readyz", "/healthz", "/metrics")
BODY_TIMEOUT_S = 60


class RequestGuard:
    """``settings``: the serving settings, or a callable that reads them when the app is built;
    ``file_fields``: route -> names of its file fields."""

    def __init__(self, app, *, settings: ServeSettings | Callable[[], ServeSettings],
                 file_fields: Mapping[str, tuple[str, ...]]):
        settings = settings if isinstance(settings, ServeSettings) else settings()
        self.app, self.token, self.max_body_bytes = app, settings.token, settings.max_body_bytes
        self.file_fields = dict(file_fields)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if self.token is not None and not self._authorized(headers.get("authorization", "")):
            return await _reject(send, 401, "missing or wrong bearer token (Authorization: Bearer <token>)",
                                 {"www-authenticate": "Bearer"})
        declared = headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_body_bytes):
            return await _reject(send, 413, f"request body of {declared} bytes exceeds the cap of "
                                            f"{self.max_body_bytes} bytes")
        try:  # a streamed body is counted as it comes, and must come in time
            body = await asyncio.wait_for(_read_body(receive, self.max_body_bytes), BODY_TIMEOUT_S)
        except asyncio.TimeoutError:
            return await _reject(send, 408, f"the request body did not arrive within {BODY_TIMEOUT_S} s")
        if body is None:
            return await _reject(send, 413, f"request body exceeds the cap of {self.max_body_bytes} bytes")
        fields = self.file_fields.get(scope["path"])
        problem = None if fields is None else _check_upload(headers.get("content-type", ""), body, fields)
        if problem is not None:
            return await _reject(send, *problem)
        return await self.app(scope, _replay(body, receive), _one_line_errors(send))

    def _authorized(self, header: str) -> bool:
        scheme, _, credentials = header.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(credentials.strip().encode(), self.token.encode())


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


def _check_upload(content_type: str, body: bytes, fields: tuple[str, ...]) -> tuple[int, str] | None:
    """(status, reason) when the body is not multipart with every file field an uploaded file part."""
    kind, options = parse_options_header(content_type)
    if kind != b"multipart/form-data":
        shown = kind.decode("latin-1") or "none"
        return 415, f"send multipart/form-data with the file in field '{fields[0]}' (got content type {shown})"
    boundary = options.get(b"boundary")
    if not boundary:
        return 400, "multipart body without a boundary"
    for name, filename in _parts(body, boundary):
        if name in fields and filename is None:
            return 400, f"field '{name}' must be an uploaded file (curl -F {name}=@FILE); URLs are never fetched"
        if name not in fields and filename is not None:
            return 400, f"field '{name}' takes no file (the file goes in '{fields[0]}')"
    return None


def _parts(body: bytes, boundary: bytes):
    """(name, filename or None) of every part, from its Content-Disposition header."""
    delimiter = b"--" + boundary
    start = body.find(delimiter)
    while start != -1:
        header_start = start + len(delimiter)
        if body[header_start:header_start + 2] == b"--":  # the closing delimiter
            return
        header_end = body.find(b"\r\n\r\n", header_start)
        if header_end == -1:
            return
        for line in body[header_start:header_end].split(b"\r\n"):
            key, _, value = line.partition(b":")
            if key.strip().lower() == b"content-disposition":
                _, options = parse_options_header(value.strip())
                name = options.get(b"name", b"").decode("utf-8", "replace")
                filename = options.get(b"filename")
                yield name, None if filename is None else filename.decode("utf-8", "replace")
        start = body.find(b"\r\n" + delimiter, header_end)
        start = -1 if start == -1 else start + 2


def _one_line_errors(send: Send) -> Send:
    """Rewrite BentoML's JSON 400 validation errors so ``error`` names each field and what is wrong."""
    held: dict = {}

    async def wrapped(message: dict) -> None:
        if message["type"] == "http.response.start" and message["status"] == 400:
            held["start"] = message
            held["body"] = b""
            return
        if "start" not in held:
            return await send(message)
        held["body"] += message.get("body", b"")
        if message.get("more_body", False):
            return
        body = _rewrite(held["body"])
        start = held.pop("start")
        headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
        headers.append((b"content-length", str(len(body)).encode()))
        await send({**start, "headers": headers})
        await send({"type": "http.response.body", "body": body, "more_body": False})

    return wrapped


def _rewrite(body: bytes) -> bytes:
    try:
        data = json.loads(body)
    except ValueError:
        return body
    if isinstance(data, list) and len(data) == 1 and isinstance(data[0], dict):
        data = data[0]  # BentoML wraps InvalidArgument errors in a list
    if isinstance(data, dict) and isinstance(data.get("detail"), list):
        reasons = []
        for item in data["detail"]:
            if isinstance(item, dict):
                where = ".".join(str(part) for part in item.get("loc", ())) or "input"
                reasons.append(f"{where}: {item.get('msg', 'invalid')}")
        if reasons:
            data = {"error": "; ".join(reasons), "detail": data["detail"]}
    return json.dumps(data).encode()


async def _reject(send: Send, status: int, reason: str, headers: Mapping[str, str] | None = None) -> None:
    from csc_serve.service.metrics import metrics

    metrics().rejected.labels(status=str(status)).inc()
    body = json.dumps({"error": reason}).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})
