"""What ``csc bench --http`` does on the wire: HTTP requests prepared once and sent back to back on keep-alive
connections (the clients share the machine with the server, so each does as little as it can per request),
and the server's resident memory watched while they run."""

from __future__ import annotations

import io
import json
import os
import threading
import time
import uuid
from urllib.parse import urlsplit

import numpy as np


def prepared_request(url: str, endpoint: str, body: tuple[bytes, str]) -> bytes:
    parts = urlsplit(url)
    headers = {"Host": parts.netloc, "Content-Type": body[1], "Content-Length": str(len(body[0]))}
    if os.environ.get("CSC_SERVE_TOKEN"):
        headers["Authorization"] = f"Bearer {os.environ['CSC_SERVE_TOKEN']}"
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    return f"POST /{endpoint} HTTP/1.1\r\n{head}\r\n".encode("latin-1") + body[0]


def client_loop(url: str, endpoint: str, body: tuple[bytes, str], stop_at: float, out: list) -> None:
    """One client: the same request, prepared once, sent back to back on one keep-alive connection.

    The client shares the machine with the server, so it does as little as it can per request: the request
    bytes are built once and the answer is read by its Content-Length, with no header parsing beyond that.
    """
    parts = urlsplit(url)
    request = prepared_request(url, endpoint, body)
    connection = None
    while time.monotonic() < stop_at:
        start = time.monotonic()
        try:
            if connection is None:
                connection = Connection(parts.hostname, parts.port)
            status: int | str = connection.exchange(request)[0]
        except (OSError, ValueError) as err:
            status = type(err).__name__
            if connection is not None:
                connection.close()
            connection = None
        out.append((start, time.monotonic() - start, status))
    if connection is not None:
        connection.close()


class Connection:
    """A keep-alive HTTP/1.1 connection that sends prepared requests and reads answers by Content-Length: the
    body is received into one reused buffer and dropped, so the client costs the machine little beside the
    server it measures."""

    def __init__(self, host: str, port: int, timeout: float = 120):
        import socket

        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buffer = b""  # received beyond the last answer
        self._scratch = memoryview(bytearray(1 << 20))

    def exchange(self, request: bytes, keep_headers: bool = False) -> tuple[int, dict[str, str]]:
        """The status of the answer to ``request`` (and its headers, lower-cased, with ``keep_headers``)."""
        self.sock.sendall(request)
        while (end := self.buffer.find(b"\r\n\r\n")) < 0:
            self._fill()
        head, self.buffer = self.buffer[:end].decode("latin-1"), self.buffer[end + 4:]
        lines = head.split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        fields = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:] if ":" in line)}
        length = fields.get("content-length")
        if length is None:
            raise ValueError("answer without Content-Length")
        self._skip(int(length))
        return status, (fields if keep_headers else {})

    def _fill(self) -> None:
        chunk = self.sock.recv(1 << 16)
        if not chunk:
            raise ConnectionError("the server closed the connection")
        self.buffer += chunk

    def _skip(self, length: int) -> None:
        """Drop the next ``length`` bytes of the stream (the body of an answer)."""
        held = min(length, len(self.buffer))
        self.buffer, remaining = self.buffer[held:], length - held
        while remaining:
            received = self.sock.recv_into(self._scratch, min(remaining, len(self._scratch)))
            if not received:
                raise ConnectionError("the server closed the connection")
            remaining -= received

    def close(self) -> None:
        self.sock.close()


def show_progress(records, start: float, measure_from: float, stop_at: float, endpoint: str) -> None:
    from tqdm import tqdm

    with tqdm(total=round(stop_at - start), desc=f"/{endpoint}", unit="s", leave=False) as bar:
        while time.monotonic() < stop_at:
            time.sleep(1.0)
            done = sum(len(r) for r in records)
            bar.update(1)
            bar.set_postfix(requests=done, phase="warm-up" if time.monotonic() < measure_from else "measured")


class MetadataClient:
    def __init__(self, url: str):
        self.url = url

    def metadata(self) -> dict:
        import urllib.request

        request = urllib.request.Request(self.url + "/metadata", data=b"{}", method="POST",
                                         headers={"Content-Type": "application/json", **_auth()})
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())


class MemorySampler(threading.Thread):
    """The server's resident memory over time: its whole process tree (``pid`` given), five times a second, or
    the worker's own from /metadata, once a second."""

    def __init__(self, client: MetadataClient, pid: int | None):
        super().__init__(daemon=True)
        self.client, self.pid = client, pid
        self.samples: list[tuple[float, int]] = []
        self.source = "process tree" if pid is not None else "worker (/metadata)"
        self._stop_event = threading.Event()

    def measure(self) -> int | None:
        if self.pid is not None:
            import psutil

            try:
                root = psutil.Process(self.pid)
                total = 0
                for process in [root, *root.children(recursive=True)]:
                    try:
                        total += process.memory_info().rss
                    except psutil.NoSuchProcess:
                        pass
                return total
            except psutil.NoSuchProcess:
                return None
        try:
            return self.client.metadata()["process"]["rss_bytes"]
        except (OSError, ValueError, KeyError):
            return None

    def run(self) -> None:
        period = 0.2 if self.pid is not None else 1.0
        while not self._stop_event.is_set():
            rss = self.measure()
            if rss:
                self.samples.append((time.monotonic(), rss))
            self._stop_event.wait(period)

    def now(self) -> int | None:
        return self.measure()

    def peak(self, since: float) -> int | None:
        values = [rss for t, rss in self.samples if t >= since]
        now = self.measure()
        return max(values + ([now] if now else []), default=None)

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=30)


def _auth() -> dict[str, str]:
    token = os.environ.get("CSC_SERVE_TOKEN")
    return {"Authorization": f"Bearer {token}"} if token else {}


def png_bytes_of(image: np.ndarray) -> bytes:
    from csc_serve.service.payloads import png_bytes

    return png_bytes(image)


def decoded_png(png: bytes) -> np.ndarray:
    """The float32 (C, H, W) image a PNG holds, as the server reads it."""
    from PIL import Image

    with Image.open(io.BytesIO(png)) as image:
        array = np.asarray(image.convert("RGB"), np.float32) / 255.0
    return np.ascontiguousarray(array.transpose(2, 0, 1))


def multipart_body(png: bytes, fields: dict[str, str]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    out = io.BytesIO()
    for name, value in fields.items():
        out.write(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    out.write(f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="bench.png"\r\n'
              f"Content-Type: image/png\r\n\r\n".encode())
    out.write(png)
    out.write(f"\r\n--{boundary}--\r\n".encode())
    return out.getvalue(), f"multipart/form-data; boundary={boundary}"
