"""``csc bench --http``: concurrent clients against the HTTP service, set against the raw backend, and the memory
the served process tree holds.

One run, on one server:

1. **One large image** (``large`` pixels a side; 0 skips it): a blind ``/denoise`` of it (the server estimates
   the noise level), its time against a direct call of the raw backend on the same image at the same scale
   (in this process), and the peak memory of the server while it works.
2. **Rounds of load** (``rounds``): in each, ``clients`` threads post ``size`` x ``size`` PNG images (crops of
   ``--data``, or synthetic ones) to each endpoint in turn, back to back for ``duration`` seconds after an
   uncounted warm-up. Per endpoint: requests/s, p50 and p99 latency, errors, and the throughput of the backend
   alone on the same images at the service's batch size (the call that endpoint makes, measured in this
   process before and after its load; the ratio uses the mean of the two).

Memory is the resident set of the server's whole process tree (``bentoml serve`` and its workers), sampled
five times a second, when the bench started the server; for a server at a URL, the worker's own resident
set from ``/metadata``, once a second. ``TARGETS``: every ratio >= 0.9, no errors, at most 1.5 GiB under load,
at most 1 GiB and 1.1 times the direct call for the large image, and memory at the end of the last round
within 10 % of the round before (no leak).
"""

from __future__ import annotations

import argparse
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from csc_serve.bench.load import (
    Connection,
    MemorySampler,
    MetadataClient,
    client_loop,
    decoded_png,
    multipart_body,
    png_bytes_of,
    prepared_request,
    show_progress,
)
from csc_serve.service.metadata import HIDDEN

TARGETS = {"min_ratio": 0.9, "max_errors": 0, "max_load_bytes": 1.5 * 2**30, "max_large_bytes": 2**30,
           "max_large_ratio": 1.1, "max_round_growth": 0.10}
ENDPOINTS = ("encode", "reconstruct", "denoise")


@dataclass(frozen=True)
class HttpBenchConfig:
    url: str | None = None  # None: start a server for `model`
    model: str = "csc-ctrl-rgb"
    backend: str = "auto"
    clients: int = 32
    duration: float = 60.0  # measured seconds per endpoint and round
    warmup: float = 5.0
    endpoints: tuple[str, ...] = ENDPOINTS
    sigma: float | None = 25.0  # sent to /denoise; None: the server estimates it per image
    size: int = 64
    data: str | None = None
    raw_seconds: float = 5.0  # at most a quarter of the duration
    rounds: int = 1
    large: int = 1000  # side of the large image; 0: none


def run_http_bench(cfg: HttpBenchConfig, log=print) -> dict[str, Any]:
    from csc_serve.service.process import ServerProcess

    if cfg.url is not None:
        return _bench(cfg, cfg.url, None, log)
    log(f"starting bentoml serve for {cfg.model} ({cfg.backend})")
    # the raw-backend comparison loads the served model here, so this server tells where it is
    with ServerProcess(env={"CSC_MODEL": cfg.model, "CSC_BACKEND": cfg.backend, "CSC_SHOW_PATHS": "true"}) as server:
        log(f"server ready at {server.url}")
        return _bench(cfg, server.url, server.process.pid, log)


def _bench(cfg: HttpBenchConfig, url: str, pid: int | None, log) -> dict[str, Any]:
    client = MetadataClient(url)
    meta = client.metadata()
    if not meta.get("ready"):
        raise ValueError(f"{url} is not ready: {meta.get('error') or 'still loading'}")
    channels = meta["model"]["config"]["in_channels"]
    settings = meta["settings"]
    # The largest batch the service forms of these images: its image count and pixel caps.
    batch = max(1, min(settings["max_batch_size"], settings.get("max_batch_pixels", 1 << 62) // cfg.size ** 2))
    images = _images(cfg, channels, cfg.size, max(cfg.clients, 1))
    raw = _RawBackend(meta, log)
    memory = MemorySampler(client, pid)
    memory.start()
    report: dict[str, Any] = {
        "config": asdict(cfg) | {"url": url},
        "server": {"backend": meta["backend"], "max_batch_size": settings["max_batch_size"],
                   "max_batch_pixels": settings.get("max_batch_pixels"), "batch": batch,
                   "tile_size": settings["tile_size"], "weights_sha256": meta["model"]["weights_sha256"]},
        "memory_source": memory.source,
    }
    try:
        report["idle_bytes"] = memory.now()
        if cfg.large:
            report["large"] = _large_image(cfg, url, raw, memory, channels, log)
        raw_seconds = max(1.0, min(cfg.raw_seconds, cfg.duration / 4))
        report["rounds"] = []
        for round_index in range(cfg.rounds):
            endpoints = {}
            since = time.monotonic()
            for endpoint in cfg.endpoints:
                endpoints[endpoint] = _load(cfg, url, endpoint, images, raw.batch_call(endpoint, images, batch),
                                            raw_seconds, log)
            report["rounds"].append({"round": round_index + 1, "endpoints": endpoints,
                                     "peak_bytes": memory.peak(since), "end_bytes": memory.now()})
    finally:
        memory.stop()
    report["targets"] = _targets(report)
    return report


def _targets(report: dict[str, Any]) -> dict[str, Any]:
    rounds, large = report["rounds"], report.get("large")
    ratios = [e["ratio_to_raw"] for r in rounds for e in r["endpoints"].values()]
    ends = [r["end_bytes"] for r in rounds]
    growth = (ends[-1] - ends[-2]) / ends[-2] if len(ends) >= 2 and ends[-2] else None
    out = {
        "ratio_ok": bool(ratios) and all(r is not None and r >= TARGETS["min_ratio"] for r in ratios),
        "errors_ok": all(e["errors"] <= TARGETS["max_errors"] for r in rounds for e in r["endpoints"].values()),
        "load_memory_ok": all(r["peak_bytes"] is not None and r["peak_bytes"] <= TARGETS["max_load_bytes"]
                              for r in rounds),
        "round_growth": growth,
        "growth_ok": None if growth is None else growth < TARGETS["max_round_growth"],
        **TARGETS,
    }
    if large is not None:
        out["large_memory_ok"] = large["peak_bytes"] is not None and large["peak_bytes"] <= TARGETS["max_large_bytes"]
        out["large_time_ok"] = large["ratio_to_direct"] <= TARGETS["max_large_ratio"]
    return out


def _images(cfg: HttpBenchConfig, channels: int, size: int, count: int) -> np.ndarray:
    from csc_serve.bench.timing import bench_images

    return bench_images(count, size, channels, cfg.data, seed=1)


def _large_image(cfg: HttpBenchConfig, url: str, raw: _RawBackend, memory: MemorySampler, channels: int,
                 log) -> dict[str, Any]:
    """A blind /denoise of one ``large`` x ``large`` image with noise of sigma 25 added, against the direct
    backend call on it (the same noise estimate and scale), and the server's peak memory meanwhile."""
    clean = _images(cfg, channels, cfg.large, 1)[0]
    noisy = clean + np.random.default_rng(2).normal(0, 25 / 255, clean.shape).astype(np.float32)
    png = png_bytes_of(np.clip(noisy, 0, 1))
    sent = decoded_png(png)  # what the server sees: the 8-bit image
    log(f"one blind /denoise of a {cfg.large}x{cfg.large} PNG")
    since = time.monotonic()
    body, content_type = multipart_body(png, {})
    start = time.perf_counter()
    connection = Connection(urlsplit(url).hostname, urlsplit(url).port, timeout=1800)
    try:
        status, headers = connection.exchange(prepared_request(url, "denoise", (body, content_type)), keep_headers=True)
    finally:
        connection.close()
    seconds = time.perf_counter() - start
    peak = memory.peak(since)
    log(f"direct backend call on the same {cfg.large}x{cfg.large} image")
    direct = raw.direct_denoise(sent)
    return {"size": cfg.large, "status": status, "seconds": seconds, "server_timing": headers.get("server-timing"),
            "sigma": float(headers.get("x-csc-sigma", "nan")), "direct_seconds": direct,
            "ratio_to_direct": seconds / direct, "peak_bytes": peak}


def _load(cfg: HttpBenchConfig, url: str, endpoint: str, images: np.ndarray, raw_call, raw_seconds: float,
          log) -> dict[str, Any]:
    """Clients against one endpoint, between two timings of the raw backend's call for it."""
    raw_runs = [raw_call.time(raw_seconds)]  # before the load, on an idle server
    fields = {"sigma": f"{cfg.sigma:g}"} if endpoint == "denoise" and cfg.sigma is not None else {}
    if endpoint == "encode":
        fields = {"stage_sparsity": "true"}  # its default: every stage's sparsity, from the same pass
    bodies = [multipart_body(png_bytes_of(image), fields) for image in images]
    log(f"{cfg.clients} clients -> /{endpoint}, {cfg.size}x{cfg.size} PNG: {cfg.warmup:.0f} s warm-up, "
        f"{cfg.duration:.0f} s measured")
    start = time.monotonic()
    measure_from, stop_at = start + cfg.warmup, start + cfg.warmup + cfg.duration
    records: list[list[tuple[float, float, int | str]]] = [[] for _ in range(cfg.clients)]
    threads = [threading.Thread(target=client_loop, args=(url, endpoint, bodies[i % len(bodies)], stop_at,
                                                          records[i]), daemon=True) for i in range(cfg.clients)]
    for thread in threads:
        thread.start()
    show_progress(records, start, measure_from, stop_at, endpoint)
    for thread in threads:
        thread.join(timeout=max(60.0, cfg.duration))
    raw_runs.append(raw_call.time(raw_seconds))  # and after it: the machine's speed drifts
    measured = [r for rs in records for r in rs if r[0] >= measure_from]
    latencies = np.array([r[1] for r in measured if r[2] == 200]) * 1000
    errors = [r[2] for r in measured if r[2] != 200]
    throughput = len(latencies) / cfg.duration
    raw_rate = float(np.mean(raw_runs))
    return {
        "throughput_rps": throughput,
        "latency_ms": {"p50": _percentile(latencies, 50), "p99": _percentile(latencies, 99),
                       "mean": float(latencies.mean()) if latencies.size else None},
        "requests": len(measured), "errors": len(errors), "error_kinds": sorted({str(e) for e in errors})[:5],
        "raw_backend": {"backend": raw_call.backend, "call": raw_call.name, "batch": raw_call.batch,
                        "images_per_s_runs": raw_runs, "images_per_s": raw_rate},
        "ratio_to_raw": throughput / raw_rate if raw_rate else None,
    }


class _RawBackend:
    """The server's backend, in this process: the very graphs the server runs, when it runs on this machine."""

    def __init__(self, meta: dict, log):
        from csc_serve.backends import load_backend

        served = meta["backend"]
        self.name = {"onnxruntime": f"onnxruntime-{served['device']}"}.get(served["backend"], served["backend"])
        kwargs = {"device": served["device"]} if self.name == "torch" else {}
        artifacts = meta["artifacts"].get("directory")
        if artifacts and Path(artifacts).is_dir() and self.name != "torch":
            kwargs["artifacts"] = artifacts
        self.backend = load_backend(_model_here(meta["model"]), self.name, **kwargs)
        self.knots = meta["model"]["config"].get("noise_calibration")
        self.log = log

    def batch_call(self, endpoint: str, images: np.ndarray, batch: int) -> _RawCall:
        """The call behind ``endpoint`` on a batch of ``images`` at the service's batch size, with what it
        reports: encode with every stage's zero counts, reconstruct with its own."""
        inputs = np.stack([images[i % len(images)] for i in range(batch)])
        call = self.backend.encode_counting if endpoint == "encode" else self.backend.reconstruct_counting
        scale = 1.0
        if endpoint == "denoise" and self.knots:
            from csc_serve.models.calibration import scale_for_sigma

            scale = float(scale_for_sigma(self.knots, 25.0)[0])
        return _RawCall(self.name, call.__name__, batch, lambda: call(inputs, scale), self.log)

    def direct_denoise(self, image: np.ndarray) -> float:
        """Seconds of what a blind /denoise computes, called directly: the noise estimate, the calibrated scale,
        the backend's reconstruction of the whole image (best of two calls)."""
        from csc_serve.models.calibration import scale_for_sigma
        from csc_serve.models.noise import estimate_noise_sigma

        def call():
            sigma = float(estimate_noise_sigma(image)[0])
            scale = float(scale_for_sigma(self.knots, sigma)[0]) if self.knots else 1.0
            self.backend.reconstruct(image[None], scale, sigma)

        times = []
        for _ in range(2):
            start = time.perf_counter()
            call()
            times.append(time.perf_counter() - start)
        return min(times)


@dataclass
class _RawCall:
    backend: str
    name: str
    batch: int
    call: Any
    log: Any

    def time(self, seconds: float) -> float:
        from csc_serve.bench.timing import time_call

        self.log(f"raw backend: {self.backend}, {self.name}, batch {self.batch}, {seconds:.0f} s")
        return self.batch / time_call(self.call, seconds, 2)["median_s"]


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


def _percentile(values: np.ndarray, q: float) -> float | None:
    return float(np.percentile(values, q)) if values.size else None


def format_report(report: dict[str, Any]) -> str:
    ok, cfg = report["targets"], report["config"]
    lines = [f"HTTP, {cfg['clients']} clients, {cfg['size']}x{cfg['size']} PNG, {cfg['duration']:.0f} s per endpoint, "
             f"{len(report['rounds'])} round(s); memory: {report['memory_source']}, "
             f"idle {_mib(report['idle_bytes'])}"]
    large = report.get("large")
    if large is not None:
        lines.append(f"  {large['size']}x{large['size']} blind /denoise: {large['seconds']:.2f} s (direct backend "
                     f"call {large['direct_seconds']:.2f} s: {large['ratio_to_direct']:.2f}x, target <= "
                     f"{ok['max_large_ratio']}) {_mark(ok['large_time_ok'])}; peak {_mib(large['peak_bytes'])} "
                     f"(target <= {_mib(ok['max_large_bytes'])}) {_mark(ok['large_memory_ok'])}")
    for rnd in report["rounds"]:
        lines.append(f"  round {rnd['round']}: peak {_mib(rnd['peak_bytes'])} (target <= "
                     f"{_mib(ok['max_load_bytes'])}), {_mib(rnd['end_bytes'])} at its end")
        for endpoint, e in rnd["endpoints"].items():
            lat, raw = e["latency_ms"], e["raw_backend"]
            ratio = "n/a" if e["ratio_to_raw"] is None else f"{e['ratio_to_raw']:.2f}"
            p50 = "n/a" if lat["p50"] is None else f"{lat['p50']:.0f}"
            p99 = "n/a" if lat["p99"] is None else f"{lat['p99']:.0f}"
            met = e["ratio_to_raw"] is not None and e["ratio_to_raw"] >= ok["min_ratio"]
            lines.append(f"    /{endpoint:<12} {e['throughput_rps']:7.1f} req/s  raw {raw['call']} "
                         f"{raw['images_per_s']:7.1f} img/s  ratio {ratio} {_mark(met)}"
                         f"  p50 {p50} ms  p99 {p99} ms  errors {e['errors']} of {e['requests']}")
    growth = ok["round_growth"]
    if growth is not None:
        last = len(report["rounds"])
        lines.append(f"  memory from round {last - 1} to {last}: {100 * growth:+.1f} % "
                     f"(target < {100 * ok['max_round_growth']:.0f} %) {_mark(ok['growth_ok'])}")
    return "\n".join(lines)


def _mib(value: float | None) -> str:
    return "n/a" if value is None else f"{value / 2**20:.0f} MiB"


def _mark(ok: bool) -> str:
    return "ok" if ok else "MISSED"


# ----------------------------------------------------------------------------- the command line
def add_http_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("HTTP load (--http)")
    group.add_argument("--http", nargs="?", const="", default=None, metavar="URL",
                       help="load-test the HTTP service at URL instead, with images of the smallest --sizes "
                       "(no URL: start 'bentoml serve' for MODEL and measure its whole process tree's memory)")
    group.add_argument("--clients", type=int, default=32, help="concurrent clients (default: 32)")
    group.add_argument("--duration", type=float, default=60.0, help="measured seconds per endpoint (default: 60)")
    group.add_argument("--warmup", type=float, default=5.0, help="uncounted seconds first (default: 5)")
    group.add_argument("--endpoint", default=",".join(ENDPOINTS),
                       help=f"comma-separated endpoints, loaded in turn (default: {','.join(ENDPOINTS)})")
    group.add_argument("--sigma", type=float, default=25.0,
                       help="noise level sent to /denoise (default: 25; negative: estimated by the server)")
    group.add_argument("--rounds", type=int, default=1,
                       help="rounds of the load; from 2 on, the memory growth between the last two is checked "
                       "(default: 1)")
    group.add_argument("--large", type=int, default=1000,
                       help="side of one large image denoised first, timed against a direct backend call, with the "
                       "server's peak memory (default: 1000; 0: none)")
    group.add_argument("--serve-backend", default="auto", help="backend of the server it starts (default: auto)")


def run_from_args(args: argparse.Namespace) -> None:
    from csc_serve.bench.timing import write_report

    endpoints = tuple(e.strip().lstrip("/") for e in args.endpoint.split(",") if e.strip())
    unknown = sorted(set(endpoints) - set(ENDPOINTS))
    if unknown or not endpoints:
        raise ValueError(f"unknown endpoint(s) {unknown or args.endpoint!r}; choose from {', '.join(ENDPOINTS)}")
    if args.clients < 1 or args.duration <= 0 or args.warmup < 0 or args.rounds < 1 or args.large < 0:
        raise ValueError("--clients and --rounds must be >= 1, --duration > 0, --warmup and --large >= 0")
    cfg = HttpBenchConfig(url=args.http or None, model=args.model, backend=args.serve_backend, clients=args.clients,
                          duration=args.duration, warmup=args.warmup, endpoints=endpoints,
                          sigma=args.sigma if args.sigma >= 0 else None, size=min(args.sizes), data=args.data,
                          rounds=args.rounds, large=args.large)
    report = run_http_bench(cfg)
    print(format_report(report))
    write_report(report, args.json)
    print(f"results: {args.json}")
