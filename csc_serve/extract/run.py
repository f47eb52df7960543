"""Batch feature extraction: the sparse codes of every image of a collection, as Parquet shards.

``run_extract(ExtractConfig(model, input, out))`` encodes every image under ``input`` (a folder tree, a
glob such as ``photos/**/*.jpg``, or a text file listing one path per line) and writes the codes of one
encoder stage (default the last), plus a pooled dense vector per image, as shards in ``out`` (format in
``csc_serve.extract.shards``). ``load_features(out)`` returns ``{relative path: Features}``.

How it is fast: images are decoded by a thread pool a few batches ahead of the encoder, across shard ends;
a shard's images are grouped by size into batches (so nothing is padded), each encoded as soon as it is full
on the fastest backend that works here (``load_backend(model, "auto")``), whose worker threads also turn
the codes into rows; a writer thread appends each batch's rows to its shard while the next batches are
encoded, so memory follows the batch, not the shard. How it survives being killed: the sorted input list is
cut into fixed shards, each written atomically; ``resume=True`` skips the shards already on disk and redoes
the others exactly as an uninterrupted run would. Unreadable images are listed in ``errors.jsonl`` with the
reason and the run goes on. ``engine="ray"`` runs the same shards on Ray Data (``csc_serve.extract.ray``).

This module holds the configuration, the inputs and the driver; decoding, batching and encoding are
``csc_serve.extract.encode``, the on-disk format ``csc_serve.extract.shards``.
"""

from __future__ import annotations

import glob
import itertools
import os
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from csc_serve.extract.encode import StageEncoder, decoded, encode_shard
from csc_serve.extract.shards import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST_NAME,
    POOLING,
    ShardWriter,
    finish,
    finished_shards,
    inputs_sha256,
    read_manifest,
    remove_partial_files,
    write_manifest,
)

__all__ = ["ENGINES", "ExtractConfig", "list_inputs", "run_extract", "shards_of"]

ENGINES = ("local", "ray")
WRITES_AHEAD = 2  # batches of rows waiting for the writer thread, at most
# Settings that fix which images land in which shard and batch: a resumed run must keep them.
PLAN_KEYS = ("weights_sha256", "stage", "lmbda_scale", "pooled", "shard_size", "batch_size", "batch_pixels",
             "inputs_sha256")


@dataclass(frozen=True)
class ExtractConfig:
    model: str  # bundled name, model directory or model-store tag (name:version, name:latest)
    input: str  # folder, glob, or text file of paths
    out: str
    stage: int | None = None  # 1-based encoder stage; None: the last
    lmbda_scale: float = 1.0
    pooled: bool = True
    backend: str = "auto"
    batch_size: int = 32
    batch_pixels: int = 2**20  # a batch also ends at this many pixels: large images come fewer at a time
    shard_size: int = 256
    workers: int = 4  # decoding threads (local engine)
    prefetch: int = 4  # batches decoded ahead of the encoder (by images and by pixels, see decoded)
    resume: bool = False
    engine: str = "local"
    ray_address: str | None = None  # None: a running cluster if there is one, else a local instance
    ray_actors: int = 2
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("batch_size", "batch_pixels", "shard_size", "workers", "prefetch", "ray_actors"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.stage is not None and self.stage < 1:
            raise ValueError(f"stage counts from 1, got {self.stage}")
        if not np.isfinite(self.lmbda_scale) or self.lmbda_scale < 0:
            raise ValueError(f"lmbda_scale must be finite and non-negative, got {self.lmbda_scale}")
        if self.engine not in ENGINES:
            raise ValueError(f"unknown engine {self.engine!r}; choose from {', '.join(ENGINES)}")


# ----------------------------------------------------------------------------- inputs
def list_inputs(source: str | os.PathLike) -> list[tuple[str, str]]:
    """``(relative POSIX path, path to open)`` of every input image, sorted by the relative path.

    A folder: its image files, recursively, relative to it. A glob (``*``, ``?``, ``[``; ``**`` recurses):
    the files it matches, relative to its leading part without wildcards. A text file: one path per line
    (blank lines and ``#`` comments skipped), relative ones taken from the file's folder; a listed file
    that does not exist is still listed, and ends in the errors file.
    """
    from csc_serve.models.images import list_images

    text = os.fspath(source)
    path = Path(text)
    if path.is_dir():
        pairs = [(p.relative_to(path).as_posix(), str(p)) for p in list_images(path)]
    elif glob.has_magic(text):
        parts = Path(text).parts
        fixed = next(i for i, part in enumerate(parts) if glob.has_magic(part))
        root = Path(*parts[:fixed]) if fixed else Path(".")
        matches = [Path(p) for p in glob.glob(text, recursive=True)]
        pairs = [(p.relative_to(root).as_posix(), str(p)) for p in matches if p.is_file()]
        if not pairs:
            raise FileNotFoundError(f"{text}: the glob matches no files")
    elif path.is_file():
        pairs = _listed(path)
    else:
        raise FileNotFoundError(f"{text}: no such folder or list file, and not a glob")
    unique = dict(sorted(pairs))
    return list(unique.items())


def _listed(list_file: Path) -> list[tuple[str, str]]:
    try:
        lines = list_file.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise ValueError(f"{list_file}: not a text file of image paths (give a folder, a glob or a list)") from None
    base = list_file.parent
    pairs = []
    for line in (line.strip() for line in lines):
        if not line or line.startswith("#"):
            continue
        listed = Path(line)
        full = listed if listed.is_absolute() else base / listed
        try:
            relative = full.relative_to(base).as_posix()
        except ValueError:
            relative = full.as_posix()
        pairs.append((relative, str(full)))
    if not pairs:
        raise ValueError(f"{list_file}: lists no image paths")
    return pairs


def shards_of(pairs: list, shard_size: int) -> list[list]:
    return [pairs[i : i + shard_size] for i in range(0, len(pairs), shard_size)]


# ----------------------------------------------------------------------------- the run
def _start(cfg: ExtractConfig, encoder: StageEncoder, pairs: list[tuple[str, str]]) -> dict:
    """The manifest of this run, checked against the one on disk when resuming."""
    out = Path(cfg.out)
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": cfg.model,
        "weights_sha256": encoder.weights_sha256,
        "stage": encoder.stage,
        "num_stages": len(encoder.config.stages),
        "lmbda_scale": cfg.lmbda_scale,
        "pooled": cfg.pooled,
        "pooling": POOLING if cfg.pooled else None,
        "shard_size": cfg.shard_size,
        "batch_size": cfg.batch_size,
        "batch_pixels": cfg.batch_pixels,
        "input": os.fspath(cfg.input),
        "inputs_sha256": inputs_sha256([relative for relative, _ in pairs]),
        "counts": {"images": len(pairs)},
        "complete": False,
    }
    if (out / MANIFEST_NAME).exists():
        if not cfg.resume:
            raise FileExistsError(f"{out}: already holds an extraction (pass --resume to continue it, or pick "
                                  "another --out)")
        previous = read_manifest(out)
        changed = [key for key in PLAN_KEYS if previous.get(key) != manifest[key]]
        if changed:
            raise ValueError(f"{out}: cannot resume, {', '.join(changed)} differ from the interrupted run")
        remove_partial_files(out)
    elif out.exists() and any(out.glob("part-*.parquet")):
        raise FileExistsError(f"{out}: holds shards but no {MANIFEST_NAME}; pick an empty --out")
    out.mkdir(parents=True, exist_ok=True)
    write_manifest(out, manifest)
    return manifest


def run_extract(cfg: ExtractConfig) -> dict:
    """Extract features as ``cfg`` says; returns the final manifest plus timing (``images_per_second``
    counts the images encoded in this run over the time spent decoding, encoding and writing them)."""
    if cfg.engine == "ray":  # before anything is written
        from csc_serve.extract.ray import require_ray

        require_ray()
    pairs = list_inputs(cfg.input)
    encoder = StageEncoder(cfg.model, cfg.stage, cfg.backend, cfg.lmbda_scale)
    manifest = _start(cfg, encoder, pairs)
    out = Path(cfg.out)
    shards = shards_of(pairs, cfg.shard_size)
    todo = [i for i in range(len(shards)) if i not in finished_shards(out)]
    import pyarrow.parquet  # noqa: F401  (imported before the clock starts: it takes a while)
    from tqdm import tqdm

    total = sum(len(shards[i]) for i in todo)
    bar = tqdm(total=total, unit="img", desc="extract", disable=not cfg.progress, smoothing=0.1)
    start = time.perf_counter()
    with bar:
        if cfg.engine == "ray":
            from csc_serve.extract.ray import run_ray

            run_ray(cfg, shards, todo, bar, encoder.source)
        else:
            _run_local(cfg, encoder, shards, todo, bar)
    elapsed = time.perf_counter() - start
    manifest = finish(out, manifest, len(shards))
    return {**manifest, "engine": cfg.engine, "backend": encoder.backend_name, "seconds": elapsed,
            "images_this_run": total, "images_per_second": total / elapsed if elapsed > 0 else float("inf"),
            "config": asdict(cfg)}


def _run_local(cfg: ExtractConfig, encoder: StageEncoder, shards: list, todo: list[int], bar) -> None:
    out = Path(cfg.out)
    channels, value_range = encoder.config.in_channels, encoder.config.value_range
    in_flight = encoder.backend.batches_in_flight if encoder.backend is not None else 1
    runner = ThreadPoolExecutor(in_flight, thread_name_prefix="csc-batch")
    with ThreadPoolExecutor(cfg.workers, thread_name_prefix="csc-decode") as pool, runner, \
            ThreadPoolExecutor(1, thread_name_prefix="csc-write") as writer:
        listed = ((rel, path) for index in todo for rel, path in shards[index])
        stream = decoded(listed, pool, cfg.workers, channels, value_range, cfg.prefetch * cfg.batch_size,
                         cfg.prefetch * cfg.batch_pixels)
        writes: deque = deque()  # the writer thread's queue, oldest first: at most WRITES_AHEAD batches

        def write(call, *args, images: int) -> None:
            while len(writes) >= WRITES_AHEAD:
                writes.popleft().result()
            future = writer.submit(call, *args)
            future.add_done_callback(lambda done: bar.update(images) if done.exception() is None else None)
            writes.append(future)

        for index in todo:
            shard = ShardWriter(out, index, cfg.pooled)
            try:
                errors = encode_shard(encoder, itertools.islice(stream, len(shards[index])),
                                      (cfg.batch_size, cfg.batch_pixels), cfg.pooled,
                                      lambda rows: write(shard.write, rows, images=len(rows)), runner, in_flight)
                write(shard.close, errors, images=len(errors))
            except BaseException:
                wait(writes)  # earlier shards still close; this one is dropped
                shard.abort()
                raise
        while writes:
            writes.popleft().result()
