"""``csc extract``: the sparse codes of a whole image collection as Parquet shards, resumable, local or on Ray."""

from __future__ import annotations

import argparse

from csc_serve.cli.common import add_model_argument, positive_int

DESCRIPTION = """\
Encode every image of INPUT with MODEL (a bundled name, a model directory or a model-store tag such as
my-model:latest) and write the sparse codes of one encoder stage (default: the last),
plus a pooled vector per image (mean |code| of each atom), as Parquet shards in --out:

  manifest.json        model weights sha256, stage, lmbda_scale, counts, shard list
  part-NNNNN.parquet   columns path, height, width, shape (K,h,w), indices, values, pooled
  errors.jsonl         {"path", "reason"} for each image that could not be read (the run goes on)

INPUT is a folder (searched recursively), a glob in quotes ('photos/**/*.jpg'), or a text file with one
image path per line. Paths in the output are relative to INPUT. Read the result in Python with
csc_serve.extract.run.load_features(OUT), or with any Parquet reader.

Images are decoded by a thread pool ahead of the encoder and batched by size on the fastest backend here;
each batch is written as it is done, so memory follows the batch, not the shard.
Each shard is written atomically: a run that is killed can be continued with --resume, which skips the
finished shards and produces exactly what an uninterrupted run would. --engine ray runs the shards on Ray
Data actors (a local instance, or the cluster given by --ray-address; install the 'ray' extra)."""


def _extract(args: argparse.Namespace) -> None:
    from csc_serve.extract.run import ExtractConfig, run_extract

    cfg = ExtractConfig(
        model=args.model, input=args.input, out=args.out, stage=args.stage, lmbda_scale=args.lmbda_scale,
        pooled=args.pooled, backend=args.backend, batch_size=args.batch_size,
        batch_pixels=args.batch_pixels, shard_size=args.shard_size,
        workers=args.workers, resume=args.resume, engine=args.engine, ray_address=args.ray_address,
        ray_actors=args.ray_actors, progress=not args.quiet,
    )
    report = run_extract(cfg)
    counts = report["counts"]
    print(f"{counts['encoded']} of {counts['images']} images encoded (stage {report['stage']}, "
          f"{report['backend']}, {report['images_per_second']:.1f} images/s), {counts['errors']} unreadable, "
          f"{counts['shards']} shards in {args.out}")


def add_extract(commands: argparse._SubParsersAction) -> None:
    from csc_serve.backends import BACKEND_NAMES
    from csc_serve.extract.run import ENGINES

    p = commands.add_parser(
        "extract",
        help="encode an image collection into sparse features (Parquet shards), resumable, local or on Ray",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_argument(p)
    p.add_argument("input", help="folder of images, quoted glob, or text file listing image paths")
    p.add_argument("--out", required=True, help="output directory (created if missing)")
    p.add_argument("--stage", type=positive_int, default=None,
                   help="encoder stage to extract, counting from 1 (default: the last; earlier ones run on torch)")
    p.add_argument("--lmbda-scale", type=float, default=1.0, help="threshold scale, 1.0 = trained (default: 1.0)")
    p.add_argument("--no-pooled", dest="pooled", action="store_false", help="do not write the pooled vector")
    p.add_argument("--backend", choices=BACKEND_NAMES, default="auto", help="runtime (default: auto, the fastest)")
    p.add_argument("--batch-size", type=positive_int, default=32, help="images per encode call (default: 32)")
    p.add_argument("--batch-pixels", type=positive_int, default=2**20,
                   help="a batch also ends at this many pixels, so large images come fewer at a time "
                   "(default: 1048576, 1024x1024)")
    p.add_argument("--shard-size", type=positive_int, default=256, help="images per shard (default: 256)")
    p.add_argument("--workers", type=positive_int, default=4, help="image decoding threads (default: 4)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    p.add_argument("--engine", choices=ENGINES, default="local", help="where to run (default: local)")
    p.add_argument("--ray-address", default=None,
                   help="Ray cluster to join, e.g. auto or ray://head:10001 "
                   "(default: RAY_ADDRESS, else a local instance)")
    p.add_argument("--ray-actors", type=positive_int, default=2, help="Ray encoder actors (default: 2)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=_extract)
