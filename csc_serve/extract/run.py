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
from typing import Callable, Iterable, Iterator

import numpy as np

from csc_serve.extract.shards import (
    FORMAT, FORMAT_VERSION, MANIFEST_NAME, POOLING, Features, ShardWriter, finish, finished_shards, inputs_sha256,
    load_features, read_manifest, remove_partial_files, sparse_row, write_manifest,
)

__all__ = ["ENGINES", "ExtractConfig", "Features", "StageEncoder", "list_inputs", "load_features", "run_extract"]

ENGINES = ("local", "ray")
WRITES_AHEAD = 2  # batches of rows waiting for the writer thread, at most
# Settings that fix which images land in which shard and batch: a resumed run must keep them.
PLAN_KEYS = ("weights_sha256", "stage", "lmbda_scale", "pooled", "shard_size", "batch_size", "batch_pixels",
             "inputs_sha256")


@dataclass(frozen=True)
class ExtractConfig:
    model: str  # model directory or bundled name
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
    from csc_serve.training.data import list_images

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


# ----------------------------------------------------------------------------- encoding
class StageEncoder:
    """Codes of one encoder stage for a batch of same-size images, plus what the manifest records.

    The last stage runs on ``load_backend(model, backend)``; an earlier stage needs every stage's codes,
    which only the PyTorch model gives (the exported graphs end at the last stage).
    """

    def __init__(self, model: str, stage: int | None = None, backend: str = "auto", lmbda_scale: float = 1.0):
        from csc_serve.backends import load_backend, resolve_model

        self.module, self.weights_sha256, _ = resolve_model(model)
        num_stages = len(self.module.config.stages)
        self.stage = num_stages if stage is None else stage
        if self.stage > num_stages:
            raise ValueError(f"stage {self.stage} does not exist: the model has {num_stages} stages")
        self.config, self.lmbda_scale = self.module.config, float(lmbda_scale)
        if self.stage == num_stages:
            self.backend = load_backend(model, backend)
            self.backend_name = self.backend.name
        elif backend not in ("auto", "torch"):
            raise ValueError(f"stage {self.stage} of {num_stages} needs the torch backend, not {backend!r}")
        else:
            self.backend, self.backend_name = None, "torch"
            self.module.ensure_step_sizes()

    def encode_each(self, images: np.ndarray, consume) -> list:
        """``consume(first, codes)`` on the ``(n, K, h, w)`` float32 codes of the chosen stage of images
        ``first, ..., first + n - 1`` of the ``(B, C, H, W)`` batch (by the backend's worker threads where it
        splits batches); the results in image order."""
        if self.backend is not None:
            return self.backend.encode_each(images, self.lmbda_scale, consume)
        import torch

        scale = torch.full((images.shape[0],), self.lmbda_scale)
        with torch.inference_mode():
            codes = self.module.encode(torch.from_numpy(images), scale, all_stages=True)
        return [consume(0, codes[self.stage - 1].float().numpy())]


def decode_image(path: str, channels: int, value_range: tuple[float, float]) -> np.ndarray | str:
    """The image as float32 ``(C, H, W)`` in the model's value range, or one line saying why it cannot be."""
    from csc_serve.training.data import load_image

    try:
        image = load_image(path, channels)  # (C, H, W) in [0, 1]
    except (ValueError, OSError) as err:
        return " ".join(str(err).split())
    low, high = value_range
    return image if (low, high) == (0.0, 1.0) else (low + (high - low) * image).astype(np.float32)


def batch_full(count: int, size: tuple[int, int], batch_size: int, batch_pixels: int) -> bool:
    """Whether ``count`` images of ``size`` make a batch: ``batch_size`` of them, or ``batch_pixels`` pixels."""
    return count >= batch_size or count * size[0] * size[1] >= batch_pixels


def form_batches(items: Iterable[tuple[str, np.ndarray | str]], batch: tuple[int, int], errors: list[dict]
                 ) -> Iterator[tuple[tuple[int, int], list[tuple[str, np.ndarray]]]]:
    """``(size, [(relative path, image), ...])`` batches of one shard's ``items``, yielded as they fill: images
    of one size in input order, a batch full per ``batch_full(count, size, *batch)``, the partial ones at the
    end. Unreadable items (a reason instead of an image) are appended to ``errors``."""
    waiting: dict[tuple[int, int], list[tuple[str, np.ndarray]]] = {}
    for relative, image in items:
        if isinstance(image, str):
            errors.append({"path": relative, "reason": image})
            continue
        size = image.shape[-2:]
        members = waiting.setdefault(size, [])
        members.append((relative, image))
        if batch_full(len(members), size, *batch):
            yield size, waiting.pop(size)
    yield from waiting.items()


def encode_shard(encoder: StageEncoder, items: Iterable[tuple[str, np.ndarray | str]], batch: tuple[int, int],
                 pooled: bool, sink: Callable[[list[dict]], None], runner: ThreadPoolExecutor | None = None,
                 in_flight: int = 1) -> list[dict]:
    """Encode one shard's decoded images, taken from ``items`` as they come: ``sink(rows)`` gets each batch's
    rows, batch after batch in a fixed order; returns the shard's errors (unreadable images, in input order).

    Batches hold images of one size in input order: a batch is encoded as soon as it is full (``batch`` is
    ``(batch_size, batch_pixels)``, see ``form_batches``), the partial ones when the shard ends. So a shard is
    always batched, and its rows ordered, the same way however its decoding is timed, and encoding starts
    long before the last image is decoded. The rows are made from the codes by the backend's worker threads
    (``StageEncoder.encode_each``). With a ``runner``, batches run on its threads, up to ``in_flight`` at
    once, so the backend's workers need not wait for the next batch to be gathered; their rows still reach
    ``sink`` in order."""
    errors: list[dict] = []
    running: deque = deque()  # (future, rows) in the order the batches were formed

    def run(size: tuple[int, int], members: list[tuple[str, np.ndarray]]) -> None:
        rows: list[dict] = [{}] * len(members)

        def to_rows(first: int, codes: np.ndarray) -> None:
            for j, ((relative, _), code) in enumerate(zip(members[first:], codes), first):
                rows[j] = sparse_row(relative, size, code, pooled)

        images = np.stack([image for _, image in members])
        if runner is None:
            encoder.encode_each(images, to_rows)
            sink(rows)
            return
        while len(running) >= in_flight:
            finish_oldest()
        running.append((runner.submit(encoder.encode_each, images, to_rows), rows))

    def finish_oldest() -> None:
        future, rows = running.popleft()
        future.result()
        sink(rows)

    for size, members in form_batches(items, batch, errors):
        run(size, members)
    while running:
        finish_oldest()
    return errors


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

            run_ray(cfg, shards, todo, bar)
        else:
            _run_local(cfg, encoder, shards, todo, bar)
    elapsed = time.perf_counter() - start
    manifest = finish(out, manifest, len(shards))
    return {**manifest, "engine": cfg.engine, "backend": encoder.backend_name, "seconds": elapsed,
            "images_this_run": total, "images_per_second": total / elapsed if elapsed > 0 else float("inf"),
            "config": asdict(cfg)}


def decoded(listed: Iterable[tuple[str, str]], pool: ThreadPoolExecutor, threads: int, channels: int,
            value_range: tuple[float, float], images_ahead: int, pixels_ahead: int):
    """``(relative path, image or reason)`` in input order, decoded by ``pool`` (``threads`` threads) ahead of
    the consumer: about ``pixels_ahead`` pixels (judged from the sizes seen so far), at most ``images_ahead``
    images, so large images are not decoded hundreds at a time."""
    window: deque = deque()  # (relative path, future), oldest first
    listed = iter(listed)
    mean_pixels = None  # a running estimate of the pixels per image

    def room() -> int:
        if mean_pixels is None:  # nothing seen yet: one image per decoding thread
            return min(images_ahead, threads)
        return max(1, min(images_ahead, int(pixels_ahead / mean_pixels)))

    while True:
        while len(window) < room():
            item = next(listed, None)
            if item is None:
                break
            window.append((item[0], pool.submit(decode_image, item[1], channels, value_range)))
        if not window:
            return
        relative, future = window.popleft()
        image = future.result()
        if not isinstance(image, str):
            pixels = image.shape[-2] * image.shape[-1]
            # up at once for a larger image, down slowly: a run of small images after a large one is no promise
            mean_pixels = pixels if mean_pixels is None else max(pixels, 0.9 * mean_pixels + 0.1 * pixels)
        yield relative, image


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
