"""The service's request guard, below every route: body checks as Starlette parses them, one-line JSON errors
whatever the app below answers, and a timeout that answers 504 and cancels the work."""

import asyncio
import json

from csc_serve.service.bodies import Route, check_body
from csc_serve.service.settings import ServeSettings


def test_the_guard_checks_multipart_forms_as_starlette_parses_them():
    route = Route(files=("image",))
    form = b'--x\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n\r\nPNG\r\n'
    big = b'--x\r\nContent-Disposition: form-data; name="sigma"\r\n\r\n' + b"1" * (1 << 20) + b"1\r\n"
    assert check_body("multipart/form-data; boundary=x", form + b"--x--\r\n", route) is None
    assert check_body("multipart/form-data; boundary=x", form + big + b"--x--\r\n", route)[0] == 413
    assert check_body("multipart/form-data; boundary=" + "b" * 300, form, route)[0] == 400
    assert check_body("application/json", b"{}", Route()) is None and check_body("", b"", Route()) is None
    assert check_body("multipart/form-data; boundary=x", form, Route())[0] == 415


def test_error_answers_are_one_line_json_whatever_the_app_below_answers():
    from csc_serve.service.guard import RequestGuard

    async def below(scope, receive, send):
        kind = scope["path"].strip("/")
        if kind == "raises":
            raise RuntimeError("boom at /srv/app/secret.py")
        body, media = {"list": (b'[{"error": "not allowed"}]', b"application/json"),
                       "text": (b"Internal  Server\nError", b"text/plain"),
                       "path": (b'{"error": "cannot read /home/u/.cache/x/encode.onnx"}', b"application/json")}[kind]
        await send({"type": "http.response.start", "status": 500 if kind != "list" else 415,
                    "headers": [(b"content-type", media)]})
        await send({"type": "http.response.body", "body": body})

    guard = RequestGuard(below, settings=ServeSettings(), routes={})

    async def call(path):
        sent = []

        async def receive():
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message):
            sent.append(message)

        await guard({"type": "http", "method": "POST", "path": path, "headers": []}, receive, send)
        return sent[0]["status"], dict(sent[0]["headers"])[b"content-type"], json.loads(sent[1]["body"])

    assert asyncio.run(call("/list")) == (415, b"application/json", {"error": "not allowed"})
    assert asyncio.run(call("/text")) == (500, b"application/json", {"error": "Internal Server Error"})
    assert asyncio.run(call("/path")) == (500, b"application/json", {"error": "cannot read <hidden>"})
    status, _, body = asyncio.run(call("/raises"))
    assert status == 500 and "boom" not in body["error"] and "srv" not in body["error"]


def test_a_request_past_the_timeout_gets_a_504_and_the_work_is_cancelled():
    from csc_serve.service.guard import CancelledTimeout

    cancelled = asyncio.Event()

    async def slow(scope, receive, send):
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    async def fast(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    async def call(inner):
        sent = []

        async def send(message):
            sent.append(message)

        await CancelledTimeout(inner, timeout=0.2)({"type": "http"}, None, send)
        await asyncio.sleep(0)
        return sent

    async def both():
        results = await call(slow), cancelled.is_set(), await call(fast)
        return (*results, [h for h in asyncio.get_running_loop()._scheduled if not h.cancelled()])

    timed_out, was_cancelled, answered, timers = asyncio.run(both())
    assert timed_out[0]["status"] == 504 and b"0.2 seconds" in timed_out[1]["body"] and was_cancelled
    assert answered[0]["status"] == 200 and answered[1]["body"] == b"ok"
    assert timers == []
