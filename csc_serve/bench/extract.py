"""``csc bench --extract INPUT``: end-to-end extraction throughput against the raw backend on the same images.

Two measurements, alternated ``repeats`` times so that drift in the machine's speed hits both alike:

- **raw**: the backend ``csc extract`` picks (``load_backend(model, backend)``), encoding every image of INPUT,
  decoded beforehand and batched exactly as the extractor batches them (by shard, by size, in input order),
  plus the figure ``csc bench`` prints (one batch of the first images, called repeatedly, median call).
- **extract**: ``run_extract`` on INPUT into a temporary directory: decoding, encoding, sparse rows and Parquet
  shards written atomically, from the first image to the final manifest.

The ratio is the median extraction rate over the larger of the two raw medians; the target is 0.8. The images
are held decoded in memory for the raw runs: give a folder of a few hundred to a few thousand images.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

TARGET = 0.8


def run_extract_bench(model: str, source: str, backend: str = "auto", batch_size: int = 32, shard_size: int = 256,
                      repeats: int = 3, min_time: float = 1.0, log=print) -> dict[str, Any]:
    from csc_serve.bench.timing import time_call
    from csc_serve.extract.encode import StageEncoder, decode_image, form_batches
    from csc_serve.extract.run import ExtractConfig, list_inputs, run_extract, shards_of

    if repeats < 1 or batch_size < 1 or shard_size < 1:
        raise ValueError("--repeats, --extract-batch and --extract-shard must be at least 1")
    pairs = list_inputs(source)
    encoder = StageEncoder(model, None, backend)
    config = encoder.config
    log(f"decoding {len(pairs)} images of {source} for the raw runs")
    limits = (batch_size, ExtractConfig.batch_pixels)
    batches = []
    for shard in shards_of(pairs, shard_size):  # as encode_shard forms them
        decoded = ((relative, decode_image(path, config.in_channels, config.value_range)) for relative, path in shard)
        batches += [np.stack([image for _, image in members]) for _, members in form_batches(decoded, limits, [])]
    images = sum(len(batch) for batch in batches)
    if not images:
        raise ValueError(f"{source}: no readable image to time")
    call = encoder.backend.encode
    call(batches[0])  # warm-up

    raw, repeated, extracted = [], [], []
    with tempfile.TemporaryDirectory(prefix="csc-extract-bench-") as scratch:
        for run in range(repeats):
            log(f"run {run + 1}/{repeats}: raw {encoder.backend_name} encode of {images} images")
            start = time.perf_counter()
            for batch in batches:
                call(batch)
            raw.append(images / (time.perf_counter() - start))
            repeated.append(len(batches[0]) / time_call(lambda: call(batches[0]), min_time, 2)["median_s"])
            log(f"run {run + 1}/{repeats}: csc extract")
            cfg = ExtractConfig(model=model, input=source, out=str(Path(scratch) / f"run{run}"), backend=backend,
                                batch_size=batch_size, shard_size=shard_size, progress=False)
            extracted.append(run_extract(cfg)["images_per_second"])
    raw_rate = max(float(np.median(raw)), float(np.median(repeated)))
    ratio = float(np.median(extracted)) / raw_rate
    return {
        "model": model, "input": str(source), "backend": encoder.backend_name, "images": images,
        "unreadable": len(pairs) - images, "batch_size": batch_size, "shard_size": shard_size, "repeats": repeats,
        "raw_collection_images_per_s": raw, "raw_repeated_batch_images_per_s": repeated,
        "extract_images_per_s": extracted, "raw_images_per_s": raw_rate,
        "ratio": ratio, "target": TARGET, "ok": ratio >= TARGET,
    }


def format_report(report: dict[str, Any]) -> str:
    def rate(value: float) -> str:
        return f"{value:.1f}" if value >= 10 else f"{value:.3g}"

    def rates(values: list[float]) -> str:
        return f"median {rate(float(np.median(values)))} of " + ", ".join(rate(v) for v in values)

    return "\n".join([
        f"extraction of {report['images']} images ({report['backend']}, batch {report['batch_size']}, "
        f"shards of {report['shard_size']}), {report['repeats']} runs, images/s",
        f"  raw encode, whole collection   {rates(report['raw_collection_images_per_s'])}",
        f"  raw encode, one batch repeated {rates(report['raw_repeated_batch_images_per_s'])}",
        f"  csc extract, end to end        {rates(report['extract_images_per_s'])}",
        f"  ratio {report['ratio']:.2f} of the larger raw median (target >= {report['target']})  "
        f"{'ok' if report['ok'] else 'MISSED'}",
    ])


def add_extract_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("extraction (--extract)")
    group.add_argument("--extract", default=None, metavar="INPUT",
                       help="time 'csc extract' on INPUT (folder, glob or list file) against the raw backend on "
                       "the same images instead")
    group.add_argument("--repeats", type=int, default=3, help="alternated raw and extraction runs (default: 3)")
    group.add_argument("--extract-batch", type=int, default=32, help="batch size of both (default: 32)")
    group.add_argument("--extract-shard", type=int, default=256, help="images per shard (default: 256)")
    group.add_argument("--extract-backend", default="auto", help="backend of both (default: auto)")


def run_from_args(args: argparse.Namespace) -> None:
    from csc_serve.bench.timing import write_report

    report = run_extract_bench(args.model, args.extract, args.extract_backend, args.extract_batch,
                               args.extract_shard, args.repeats, args.min_time)
    print(format_report(report))
    write_report(report, args.json)
    print(f"results: {args.json}")
