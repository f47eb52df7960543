"""The service's OpenAPI document as clients should read it.

BentoML lists 200, 400, 404 and 500 for every endpoint. ``document`` rewrites its document so that each
endpoint lists the statuses it can answer (401 with a token, 408, 413, 415, 503 for the endpoints that wait for
the model, 504) with the error body's schema, and every media type its 200 answer can have; ``/readyz``,
``/livez`` and ``/healthz`` list their 503.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from csc_serve.service.bodies import BODY_TIMEOUT_S, MAX_FIELD_BYTES, Route
from csc_serve.service.settings import ServeSettings


def document(spec: dict[str, Any], routes: Mapping[str, Route], settings: ServeSettings) -> dict[str, Any]:
    """BentoML's OpenAPI document with every status each endpoint can answer, the error body's schema, the
    media types of each 200 answer, the form required where it holds a file, and optional fields nullable."""
    schemas = spec.setdefault("components", {}).setdefault("schemas", {})
    schemas["Error"] = ERROR_SCHEMA
    if settings.token is not None:
        spec["components"].setdefault("securitySchemes", {})["bearer"] = {"type": "http", "scheme": "bearer"}
    paths = spec.get("paths", {})
    for path, route in routes.items():
        operation = paths.get(path, {}).get("post")
        if operation is None:
            continue
        ok = operation.get("responses", {}).get("200", {"description": "Successful Response"})
        if route.answers != ("application/json",):
            ok["content"] = {kind: {"schema": {"type": "string", "format": "binary"}} for kind in route.answers}
        operation["responses"] = {"200": ok, **{str(status): _error_answer(status, text)
                                               for status, text in sorted(_statuses(route, settings).items())}}
        if route.files and "requestBody" in operation:
            operation["requestBody"]["required"] = True  # a form holding the file; no body is a 415
        content = operation.get("requestBody", {}).get("content", {})
        if route.form and "application/json" in content:
            content.setdefault("multipart/form-data", content["application/json"])
        for body in operation.get("requestBody", {}).get("content", {}).values():
            for field in body.get("schema", {}).get("properties", {}).values():
                if "default" in field and field["default"] is None and "type" in field:
                    field["nullable"] = True  # an optional field (BentoML writes `float | None` as a number)
        if settings.token is not None:
            operation["security"] = [{"bearer": []}]
    probes = {"/readyz": "The model is still loading, or it failed to load (/livez tells which).",
              "/livez": "The model failed to load (/metadata names the error).",
              "/healthz": "The model failed to load (/metadata names the error)."}
    for path, text in probes.items():
        operation = paths.get(path, {}).get("get")
        if operation is not None:
            operation.setdefault("responses", {})["503"] = {
                "description": text, "content": {"text/plain": {"schema": {"type": "string"}}}}
    return spec


ERROR_SCHEMA = {
    "type": "object",
    "title": "Error",
    "description": "Every error answer of the endpoints.",
    "required": ["error"],
    "additionalProperties": False,
    "properties": {
        "error": {"type": "string", "description": "What is wrong, on one line."},
        "detail": {"type": "array", "items": {"type": "object"},
                   "description": "Field validation errors only: pydantic's details (loc, msg, type)."},
    },
}


def _statuses(route: Route, settings: ServeSettings) -> dict[int, str]:
    caps = f"the body is over {settings.max_body_bytes} bytes (CSC_MAX_BODY_BYTES)"
    if route.files:
        caps += f", a form field over {MAX_FIELD_BYTES >> 20} MiB"
    if route.waits_for_model:
        caps += (f", or the image over {settings.max_pixels} pixels (CSC_MAX_PIXELS) or its codes over "
                 f"{settings.max_code_values} values (CSC_MAX_CODE_VALUES)")
    wanted = (f"multipart/form-data with the file in '{route.files[0]}'" if route.files
              else "application/json, multipart/form-data, or no body" if route.form
              else "application/json, or no body")
    statuses = {
        400: "Bad request: a field fails validation, a file is not readable as what it should be, or the body is "
             "malformed (a multipart body without a boundary, or with a broken part).",
        408: f"The request body did not arrive within {BODY_TIMEOUT_S} s.",
        413: f"Too large: {caps}.",
        415: f"Wrong content type: send {wanted}.",
        500: "An unexpected error; the server log has the details.",
        504: "No answer within the request timeout (traffic.timeout, 300 s).",
    }
    if settings.token is not None:
        statuses[401] = "Missing or wrong bearer token (Authorization: Bearer <token>)."
    if route.waits_for_model:
        statuses[503] = ("The model is still loading (poll /readyz), it failed to load, or the request queue is "
                         "full (CSC_MAX_QUEUE); retry later.")
    return statuses


def _error_answer(status: int, description: str) -> dict[str, Any]:
    answer = {"description": description,
              "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
    if status == 401:
        answer["headers"] = {"WWW-Authenticate": {"schema": {"type": "string"}, "description": "Bearer"}}
    return answer
