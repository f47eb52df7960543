"""``csc bench --http``: concurrent clients against the HTTP service, set against the raw backend.

``clients`` threads post ``size`` x ``size`` PNG images (crops of ``--data``, or synthetic ones) to one
endpoint back to back for ``duration`` seconds, after a warm-up that is not counted. Reported: requests/s,
p50 and p99 latency, errors, the serving worker's memory (sampled from ``/metadata`` every second) and the
throughput of the backend alone on the same images at the service's batch size, measured in this process
before the load starts and again after it ends (the mean of the two), with the ratio of the HTTP throughput to
it. Targets: ratio >= 0.7, no errors, memory growth after warm-up < 10 %. Without a URL the bench starts its own
``bentoml serve`` and stops it afterwards.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from csc_serve.service.metadata import HIDDEN

TARGETS = {"min_ratio": 0.7, "max_errors": 0, "max_memory_growth": 0.10}
ENDPOINTS = ("reconstruct", "denoise", "encode")


@dataclass(frozen=True)
class HttpBenchConfig:
    url: str | None = None  # None: start a server for `model`
    model: str = "csc-ctrl-rgb"
    backend: str = "auto"
    clients: int = 32
    duration: float = 60.0
    warmup: float = 5.0
    endpoint: str = "denoise"
    sigma: float | None = 25.0  # sent to /denoise; None: the server estimates it per image
    size: int = 64
    data: str | None = None
    raw_seconds: float = 5.0  # at most a quarter of the duration


def run_http_bench(cfg: HttpBenchConfig, log=print) -> dict[str, Any]:
    from csc_serve.service.process import ServerProcess

    if cfg.url is not None:
        return _bench(cfg, cfg.url, log)
    log(f"starting bentoml serve for {cfg.model} ({cfg.backend})")
    # the raw-backend comparison loads the served model here, so this server tells where it is
    with ServerProcess(env={"CSC_MODEL": cfg.model, "CSC_BACKEND": cfg.backend, "CSC_SHOW_PATHS": "true"}) as server:
        log(f"server ready at {server.url}")
        return _bench(cfg, server.url, log)


def _bench(cfg: HttpBenchConfig, url: str, log) -> dict[str, Any]:
    client = _Client(url)
    meta = client.metadata()
    if not meta.get("ready"):
        raise ValueError(f"{url} is not ready: {meta.get('error') or 'still loading'}")
    channels = meta["model"]["config"]["in_channels"]
    batch = meta["settings"]["max_batch_size"]
    images = _images(cfg, channels)
    raw_seconds = max(1.0, min(cfg.raw_seconds, cfg.duration / 4))
    raw = _RawBackend(meta, images, batch, cfg.endpoint, log)
    raw.time(raw_seconds)  # before the load, on an idle server
    fields = {"sigma": f"{cfg.sigma:g}"} if cfg.endpoint == "denoise" and cfg.sigma is not None else {}
    bodies = [_multipart(_png(image), fields) for image in images]
    memory = _MemorySampler(client)
    memory.start()
    log(f"{cfg.clients} clients -> /{cfg.endpoint}, {cfg.size}x{cfg.size} PNG: {cfg.warmup:.0f} s warm-up, "
        f"{cfg.duration:.0f} s measured")
    start = time.monotonic()
    measure_from, stop_at = start + cfg.warmup, start + cfg.warmup + cfg.duration
    records: list[list[tuple[float, float, int | str]]] = [[] for _ in range(cfg.clients)]
    threads = [threading.Thread(target=_client_loop, args=(url, cfg.endpoint, bodies[i % len(bodies)], stop_at,
                                                          records[i]), daemon=True) for i in range(cfg.clients)]
    for thread in threads:
        thread.start()
    _progress(records, start, measure_from, stop_at)
    for thread in threads:
        thread.join(timeout=max(60.0, cfg.duration))
    memory.stop()
    raw.time(raw_seconds)  # and after it: the machine's speed drifts, the ratio uses the mean of both
    measured = [r for rs in records for r in rs if r[0] >= measure_from]
    latencies = np.array([r[1] for r in measured if r[2] == 200]) * 1000
    errors = [r[2] for r in measured if r[2] != 200]
    throughput = len(latencies) / cfg.duration
    rss = memory.after(measure_from)
    growth = (rss[-1] - rss[0]) / rss[0] if len(rss) >= 2 else None
    report = {
        "config": asdict(cfg) | {"url": url},
        "server": {"backend": meta["backend"], "max_batch_size": batch,
                   "weights_sha256": meta["model"]["weights_sha256"]},
        "throughput_rps": throughput,
        "latency_ms": {"p50": _percentile(latencies, 50), "p99": _percentile(latencies, 99),
                       "mean": float(latencies.mean()) if latencies.size else None},
        "requests": len(measured), "errors": len(errors), "error_kinds": sorted({str(e) for e in errors})[:5],
        "raw_backend": raw.report(),
        "ratio_to_raw": throughput / raw.images_per_s if raw.images_per_s else None,
        "memory": {"rss_bytes_after_warmup": rss[0] if rss else None, "rss_bytes_end": rss[-1] if rss else None,
                   "rss_bytes_peak": max(rss) if rss else None, "growth": growth, "samples": len(rss)},
    }
    report["targets"] = {
        "ratio_ok": report["ratio_to_raw"] is not None and report["ratio_to_raw"] >= TARGETS["min_ratio"],
        "errors_ok": report["errors"] <= TARGETS["max_errors"],
        "memory_ok": growth is not None and growth < TARGETS["max_memory_growth"],
        **TARGETS,
    }
    return report


def _images(cfg: HttpBenchConfig, channels: int) -> np.ndarray:
    from csc_serve.bench.timing import bench_images

    return bench_images(max(cfg.clients, 1), cfg.size, channels, cfg.data, seed=1)


class _RawBackend:
    """The server's backend, in this process, on the same images at the server's batch size."""

    def __init__(self, meta: dict, images: np.ndarray, batch: int, endpoint: str, log):
        from csc_serve.backends import load_backend

        served = meta["backend"]
        self.name = {"onnxruntime": f"onnxruntime-{served['device']}"}.get(served["backend"], served["backend"])
        kwargs = {"device": served["device"]} if self.name == "torch" else {}
        artifacts = meta["artifacts"].get("directory")
        if artifacts and Path(artifacts).is_dir() and self.name != "torch":
            kwargs["artifacts"] = artifacts  # the very graphs the server runs, when it runs on this machine
        backend = load_backend(_model_here(meta["model"]), self.name, **kwargs)
        self.inputs = np.stack([images[i % len(images)] for i in range(batch)])
        self.call = getattr(backend, "encode" if endpoint == "encode" else "reconstruct")
        self.batch, self.log, self.runs = batch, log, []

    def time(self, seconds: float) -> None:
        from csc_serve.bench.timing import time_call

        self.log(f"raw backend: {self.name}, {self.call.__name__}, batch {self.batch}, {seconds:.0f} s")
        self.runs.append(time_call(lambda: self.call(self.inputs, 1.0), seconds, 2)["median_s"])

    @property
    def images_per_s(self) -> float:
        return float(np.mean([self.batch / median for median in self.runs]))

    def report(self) -> dict[str, Any]:
        return {"backend": self.name, "call": self.call.__name__, "batch": self.batch,
                "median_s": self.runs, "images_per_s_runs": [self.batch / m for m in self.runs],
                "images_per_s": self.images_per_s}


def _model_here(model: dict) -> str:
    """The served model on this machine: its directory when the server is local, else its name or tag."""
    if Path(model["directory"]).is_dir():
        return model["directory"]
    reference = model["tag"] or model["reference"]
    if reference == HIDDEN:
        raise ValueError("the server hides the path of the model it serves: start it with CSC_SHOW_PATHS=true to "
                         "compare with the raw backend, or serve a bundled model or a model-store tag")
    from csc_serve.model_store import resolve_source

    return str(resolve_source(reference).directory)


def _client_loop(url: str, endpoint: str, body: tuple[bytes, str], stop_at: float, out: list) -> None:
    """One client: the same request, prepared once, sent back to back on one keep-alive connection.

    The client shares the machine with the server, so it does as little as it can per request: the request
    bytes are built once and the answer is read by its Content-Length, with no header parsing beyond that.
    """
    parts = urlsplit(url)
    headers = {"Host": parts.netloc, "Content-Type": body[1], "Content-Length": str(len(body[0]))}
    if os.environ.get("CSC_SERVE_TOKEN"):
        headers["Authorization"] = f"Bearer {os.environ['CSC_SERVE_TOKEN']}"
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    request = f"POST /{endpoint} HTTP/1.1\r\n{head}\r\n".encode("latin-1") + body[0]
    connection = None
    while time.monotonic() < stop_at:
        start = time.monotonic()
        try:
            if connection is None:
                connection = _Connection(parts.hostname, parts.port)
            status: int | str = connection.exchange(request)
        except (OSError, ValueError) as err:
            status = type(err).__name__
            if connection is not None:
                connection.close()
            connection = None
        out.append((start, time.monotonic() - start, status))
    if connection is not None:
        connection.close()


class _Connection:
    """A keep-alive HTTP/1.1 connection that sends prepared requests and reads answers by Content-Length."""

    def __init__(self, host: str, port: int, timeout: float = 120):
        import socket

        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buffer = b""

    def exchange(self, request: bytes) -> int:
        self.sock.sendall(request)
        while (end := self.buffer.find(b"\r\n\r\n")) < 0:
            self._fill()
        head, self.buffer = self.buffer[:end].decode("latin-1"), self.buffer[end + 4:]
        lines = head.split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        fields = dict(line.split(":", 1) for line in lines[1:] if ":" in line)
        length = {k.strip().lower(): v.strip() for k, v in fields.items()}.get("content-length")
        if length is None:
            raise ValueError("answer without Content-Length")
        while len(self.buffer) < int(length):
            self._fill()
        self.buffer = self.buffer[int(length):]
        return status

    def _fill(self) -> None:
        chunk = self.sock.recv(1 << 16)
        if not chunk:
            raise ConnectionError("the server closed the connection")
        self.buffer += chunk

    def close(self) -> None:
        self.sock.close()


def _progress(records, start: float, measure_from: float, stop_at: float) -> None:
    from tqdm import tqdm

    with tqdm(total=round(stop_at - start), desc="http load", unit="s", leave=False) as bar:
        while time.monotonic() < stop_at:
            time.sleep(1.0)
            done = sum(len(r) for r in records)
            bar.update(1)
            bar.set_postfix(requests=done, phase="warm-up" if time.monotonic() < measure_from else "measured")


class _Client:
    def __init__(self, url: str):
        self.url = url

    def metadata(self) -> dict:
        import urllib.request

        request = urllib.request.Request(self.url + "/metadata", data=b"{}", method="POST",
                                         headers={"Content-Type": "application/json", **_auth()})
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())


class _MemorySampler(threading.Thread):
    """The serving worker's RSS from /metadata, once a second."""

    def __init__(self, client: _Client):
        super().__init__(daemon=True)
        self.client, self.samples, self._stop_event = client, [], threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            try:
                rss = self.client.metadata()["process"]["rss_bytes"]
            except (OSError, ValueError, KeyError):
                rss = None
            if rss:
                self.samples.append((time.monotonic(), rss))
            self._stop_event.wait(1.0)

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=30)

    def after(self, moment: float) -> list[int]:
        return [rss for t, rss in self.samples if t >= moment]


def _auth() -> dict[str, str]:
    token = os.environ.get("CSC_SERVE_TOKEN")
    return {"Authorization": f"Bearer {token}"} if token else {}


def _png(image: np.ndarray) -> bytes:
    from csc_serve.service.payloads import png_bytes

    return png_bytes(image)


def _multipart(png: bytes, fields: dict[str, str]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    out = io.BytesIO()
    for name, value in fields.items():
        out.write(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    out.write(f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="bench.png"\r\n'
              f"Content-Type: image/png\r\n\r\n".encode())
    out.write(png)
    out.write(f"\r\n--{boundary}--\r\n".encode())
    return out.getvalue(), f"multipart/form-data; boundary={boundary}"


def _percentile(values: np.ndarray, q: float) -> float | None:
    return float(np.percentile(values, q)) if values.size else None


def format_report(report: dict[str, Any]) -> str:
    lat, raw, mem, ok = report["latency_ms"], report["raw_backend"], report["memory"], report["targets"]
    growth = "n/a" if mem["growth"] is None else f"{100 * mem['growth']:+.1f} %"
    ratio = "n/a" if report["ratio_to_raw"] is None else f"{report['ratio_to_raw']:.2f}"
    p50 = "n/a" if lat["p50"] is None else f"{lat['p50']:.1f}"
    p99 = "n/a" if lat["p99"] is None else f"{lat['p99']:.1f}"
    rss = "n/a" if mem["rss_bytes_end"] is None else f"{mem['rss_bytes_end'] / 2**20:.0f} MiB"
    cfg = report["config"]
    errors = f"{report['errors']} of {report['requests']} {report['error_kinds'] or ''}"
    lines = [
        f"HTTP /{cfg['endpoint']}{_sigma(cfg)}, {cfg['clients']} clients, {cfg['size']}x{cfg['size']} PNG, "
        f"{cfg['duration']:.0f} s",
        f"  throughput   {report['throughput_rps']:.1f} req/s   (raw {raw['backend']} batch {raw['batch']}: "
        f"{raw['images_per_s']:.1f} img/s, mean of {_runs(raw)}; ratio {ratio}, target >= {ok['min_ratio']})  "
        f"{_mark(ok['ratio_ok'])}",
        f"  latency      p50 {p50} ms   p99 {p99} ms",
        f"  errors       {errors}  {_mark(ok['errors_ok'])}",
        f"  memory       {rss} at the end, growth after warm-up {growth} (target < 10 %)  {_mark(ok['memory_ok'])}",
    ]
    return "\n".join(lines)


def _runs(raw: dict) -> str:
    return " and ".join(f"{rate:.1f}" for rate in raw["images_per_s_runs"])


def _sigma(cfg: dict) -> str:
    if cfg["endpoint"] != "denoise":
        return ""
    return " (sigma estimated)" if cfg["sigma"] is None else f" (sigma {cfg['sigma']:g})"


def _mark(ok: bool) -> str:
    return "ok" if ok else "MISSED"


# ----------------------------------------------------------------------------- the command line
def add_http_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("HTTP load (--http)")
    group.add_argument("--http", nargs="?", const="", default=None, metavar="URL",
                       help="load-test the HTTP service at URL instead, with images of the smallest --sizes "
                       "(no URL: start 'bentoml serve' for MODEL)")
    group.add_argument("--clients", type=int, default=32, help="concurrent clients (default: 32)")
    group.add_argument("--duration", type=float, default=60.0, help="measured seconds (default: 60)")
    group.add_argument("--warmup", type=float, default=5.0, help="uncounted seconds first (default: 5)")
    group.add_argument("--endpoint", choices=ENDPOINTS, default="denoise", help="endpoint (default: denoise)")
    group.add_argument("--sigma", type=float, default=25.0,
                       help="noise level sent to /denoise (default: 25; negative: estimated by the server)")
    group.add_argument("--serve-backend", default="auto", help="backend of the server it starts (default: auto)")


def run_from_args(args: argparse.Namespace) -> None:
    from csc_serve.bench.timing import write_report

    if args.clients < 1 or args.duration <= 0 or args.warmup < 0:
        raise ValueError("--clients must be >= 1, --duration > 0 and --warmup >= 0")
    cfg = HttpBenchConfig(url=args.http or None, model=args.model, backend=args.serve_backend, clients=args.clients,
                          duration=args.duration, warmup=args.warmup, endpoint=args.endpoint,
                          sigma=args.sigma if args.sigma >= 0 else None, size=min(args.sizes), data=args.data)
    report = run_http_bench(cfg)
    print(format_report(report))
    write_report(report, args.json)
    print(f"results: {args.json}")
