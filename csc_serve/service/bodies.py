"""What each endpoint takes, and the check of a request body against it before BentoML parses it.

An endpoint with file fields takes ``multipart/form-data`` only, the others ``application/json`` or no body,
and those marked ``form`` their plain fields as ``multipart/form-data`` as well.
A multipart body is parsed here by python-multipart, the parser Starlette uses, with Starlette's limits: no
boundary, a broken part, a part without a name or a truncated body (400), a form field over 1 MiB (413) would
otherwise fail inside BentoML's form parsing with a 500. Each file field must be an uploaded file part and no
other field may be one (BentoML would download a URL given as a plain value in a file field). Plain fields must
be values BentoML's ``json.loads`` reads or leaves as text: nesting or digits beyond Python's limits would
raise past it.
"""

from __future__ import annotations

import codecs
import json
from dataclasses import dataclass

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header

BODY_TIMEOUT_S = 60
# Starlette's limits on a multipart form (MultiPartParser): beyond them its parser raises inside BentoML.
MAX_FIELD_BYTES = 1 << 20  # a plain (non-file) field
MAX_PARTS = 1000  # files, and plain fields
MAX_NESTING = 64  # brackets in a plain field: BentoML json.loads it, and deep nesting raises RecursionError
JSON_TYPES = (b"", b"application/json")  # what the endpoints without files take (none: BentoML reads JSON)


@dataclass(frozen=True)
class Route:
    """An endpoint as the guard and the OpenAPI document see it."""

    files: tuple[str, ...] = ()  # its file fields: it takes multipart/form-data; none: JSON or no body
    answers: tuple[str, ...] = ("application/json",)  # the media types of its 200 answer
    waits_for_model: bool = True  # 503 until the model is ready, when it failed to load, or the queue is full
    form: bool = False  # without files: takes its fields as multipart/form-data too, beside JSON



def check_body(content_type: str, body: bytes, route: Route) -> tuple[int, str] | None:
    """(status, reason) when the body is not what ``route`` takes."""
    kind, options = parse_options_header(content_type)
    shown = kind.decode("latin-1") or "none"
    if not route.files:
        if kind in JSON_TYPES:
            return None
        if not (route.form and kind == b"multipart/form-data"):
            also = ", multipart/form-data" if route.form else ""
            return 415, f"send application/json{also}, or no body (got content type {shown})"
    elif kind != b"multipart/form-data":
        return 415, f"send multipart/form-data with the file in field '{route.files[0]}' (got content type {shown})"
    boundary = options.get(b"boundary")
    if not boundary:
        return 400, "multipart body without a boundary (Content-Type: multipart/form-data; boundary=...)"
    return _FormCheck(route.files, _charset(options)).run(body, boundary)


def _charset(options: dict[bytes, bytes]) -> str:
    """The charset Starlette decodes field names and values with."""
    try:
        return codecs.lookup(options.get(b"charset", b"utf-8").decode("latin-1")).name
    except LookupError:
        return "latin-1"


class _Refused(Exception):
    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status, self.reason = status, reason


class _FormCheck:
    """One pass of python-multipart over a multipart body, with Starlette's rules and the service's own: every
    file field an uploaded file, no other field a file, plain fields small and readable."""

    def __init__(self, files: tuple[str, ...], charset: str):
        self.files, self.charset = files, charset
        self.header, self.value, self.disposition = b"", b"", b""
        self.name, self.plain, self.data = "", False, bytearray()
        self.fields = self.uploads = 0
        self.ended = False

    def run(self, body: bytes, boundary: bytes) -> tuple[int, str] | None:
        # on_part_data is set for plain fields only (headers_finished): a file's data goes by uncopied.
        self.callbacks = {"on_part_begin": self.part_begin, "on_part_end": self.part_end,
                          "on_header_field": self.header_field, "on_header_value": self.header_value,
                          "on_header_end": self.header_end, "on_headers_finished": self.headers_finished,
                          "on_end": self.end}
        try:
            parser = MultipartParser(boundary, self.callbacks)
            parser.write(body)
            parser.finalize()
        except _Refused as refused:
            return refused.status, refused.reason
        except (FormParserError, ValueError) as err:
            return 400, f"malformed multipart body ({' '.join(str(err).split())})"
        if not self.ended:
            return 400, "malformed multipart body (it ends before its closing boundary)"
        return None

    def _decode(self, raw: bytes) -> str:
        try:
            return raw.decode(self.charset)
        except UnicodeDecodeError:
            return raw.decode("latin-1")

    def part_begin(self) -> None:
        self.disposition, self.data = b"", bytearray()

    def header_field(self, data: bytes, start: int, end: int) -> None:
        self.header += data[start:end]

    def header_value(self, data: bytes, start: int, end: int) -> None:
        self.value += data[start:end]

    def header_end(self) -> None:
        if self.header.lower() == b"content-disposition":
            self.disposition = self.value
        self.header, self.value = b"", b""

    def headers_finished(self) -> None:
        _, options = parse_options_header(self.disposition)
        if b"name" not in options:
            raise _Refused(400, "a multipart part without a name (Content-Disposition: form-data; name=...)")
        self.name, self.plain = self._decode(options[b"name"]), b"filename" not in options
        if self.plain:
            self.callbacks["on_part_data"] = self.part_data
        else:
            self.callbacks.pop("on_part_data", None)
        self.fields, self.uploads = self.fields + self.plain, self.uploads + (not self.plain)
        if max(self.fields, self.uploads) > MAX_PARTS:
            raise _Refused(400, f"more than {MAX_PARTS} {'fields' if self.plain else 'files'} in the form")
        if self.plain and self.name in self.files:
            raise _Refused(400, f"field '{self.name}' must be an uploaded file (curl -F {self.name}=@FILE); "
                                "URLs are never fetched")
        if not self.plain and self.name not in self.files:
            where = f"the file goes in '{self.files[0]}'" if self.files else "this endpoint takes no file"
            raise _Refused(400, f"field '{self.name}' takes no file ({where})")

    def part_data(self, data: bytes, start: int, end: int) -> None:
        self.data += data[start:end]
        if len(self.data) > MAX_FIELD_BYTES:
            raise _Refused(413, f"field '{self.name}' is over {MAX_FIELD_BYTES >> 20} MiB")

    def part_end(self) -> None:
        if self.plain:
            _check_value(self.name, self._decode(bytes(self.data)))

    def end(self) -> None:
        self.ended = True


def _check_value(name: str, text: str) -> None:
    """BentoML ``json.loads`` each plain field and keeps the text when that fails with a JSONDecodeError; any
    other error (nesting past the recursion limit, an integer of more than 4300 digits) would be a 500."""
    if text.count("[") + text.count("{") > MAX_NESTING:
        raise _Refused(400, f"field '{name}' nests more than {MAX_NESTING} brackets")
    try:
        json.loads(text)
    except json.JSONDecodeError:
        return
    except (ValueError, RecursionError) as err:
        raise _Refused(400, f"field '{name}' is not a readable value ({' '.join(str(err).split())})") from None
