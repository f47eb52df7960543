"""Batch feature extraction: the sparse codes of every image of a collection, as Parquet shards.

``run_extract(ExtractConfig(model, input, out))`` encodes every image under ``input`` (a folder tree, a
glob such as ``photos/**/*.jpg``, or a text file listing one path per line) and writes the codes of one
encoder stage (default the last), plus a pooled dense vector per image, as shards in ``out`` (format in
``csc_serve.extract_shards``). ``load_features(out)`` returns ``{relative path: Features}``.

How it is fast: images are decoded by a thread pool up to ``prefetch`` shards ahead of the encoder, a
shard's images are grouped by size into batches (so nothing is padded), and the backend is the fastest
that works here (``load_backend(model, "auto")``). How it survives being killed: the sorted input list is
cut into fixed shards, each written atomically; ``resume=True`` skips the shards already on disk and redoes
the others exactly as an uninterrupted run would. Unreadable images are listed in ``errors.jsonl`` with the
reason and the run goes on. ``engine="ray"`` runs the same shards on Ray Data (``csc_serve.extract_ray``).
"""

from __future__ import annotations

import glob
import os
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .extract_shards import (
    FORMAT, FORMAT_VERSION, MANIFEST_NAME, POOLING, Features, finish, finished_shards, inputs_sha256,
    load_features, read_manifest, remove_partial_files, sparse_row, write_manifest, write_shard,
)

__all__ = ["ENGINES", "ExtractConfig", "Features", "StageEncoder", "list_inputs", "load_features", "run_extract"]

ENGINES = ("local", "ray")
# Settings that fix which images land in which shard and batch: a resumed run must keep them.
PLAN_KEYS = ("weights_sha256", "stage", "lmbda_scale", "pooled", "shard_size", "batch_size", "inputs_sha256")


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
    shard_size: int = 256
    workers: int = 4  # decoding threads (local engine)
    prefetch: int = 2  # shards decoded ahead of the encoder
    resume: bool = False
    engine: str = "local"
    ray_address: str | None = None  # None: a running cluster if there is one, else a local instance
    ray_actors: int = 2
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("batch_size", "shard_size", "workers", "prefetch", "ray_actors"):
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
    from training.data import list_images

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
        from .backends import load_backend, resolve_model

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

    def encode(self, images: np.ndarray) -> np.ndarray:
        """``(B, C, H, W)`` float32 -> ``(B, K, h, w)`` float32 codes of the chosen stage."""
        if self.backend is not None:
            return self.backend.encode(images, self.lmbda_scale)
        import torch

        scale = torch.full((images.shape[0],), self.lmbda_scale)
        with torch.inference_mode():
            codes = self.module.encode(torch.from_numpy(images), scale, all_stages=True)
        return codes[self.stage - 1].float().numpy()


def decode_image(path: str, channels: int, value_range: tuple[float, float]) -> np.ndarray | str:
    """The image as float32 ``(C, H, W)`` in the model's value range, or one line saying why it cannot be."""
    from training.data import load_image

    try:
        image = load_image(path, channels)  # (C, H, W) in [0, 1]
    except (ValueError, OSError) as err:
        return " ".join(str(err).split())
    low, high = value_range
    return image if (low, high) == (0.0, 1.0) else (low + (high - low) * image).astype(np.float32)


def encode_shard(encoder: StageEncoder, items: list[tuple[str, np.ndarray | str]], batch_size: int,
                 pooled: bool) -> tuple[list[dict], list[dict]]:
    """Rows (in input order) and errors of one shard's decoded images. Batches hold images of one size,
    formed in input order, so the same shard is always batched the same way."""
    groups: dict[tuple[int, int], list[int]] = {}
    errors = []
    for i, (relative, image) in enumerate(items):
        if isinstance(image, str):
            errors.append({"path": relative, "reason": image})
        else:
            groups.setdefault(image.shape[-2:], []).append(i)
    rows: dict[int, dict] = {}
    for size, members in groups.items():
        for start in range(0, len(members), batch_size):
            batch = members[start : start + batch_size]
            codes = encoder.encode(np.stack([items[i][1] for i in batch]))  # (B, K, h, w)
            for i, code in zip(batch, codes):
                rows[i] = sparse_row(items[i][0], size, code, pooled)
    return [rows[i] for i in sorted(rows)], errors


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
            from .extract_ray import run_ray

            run_ray(cfg, shards, todo, bar)
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
    with ThreadPoolExecutor(cfg.workers, thread_name_prefix="csc-decode") as pool, \
            ThreadPoolExecutor(1, thread_name_prefix="csc-write") as writer:
        pending: deque = deque()  # (shard index, futures): at most `prefetch` shards decoding ahead
        queue = iter(todo)
        written = None  # the shard being written while the next one is encoded

        def submit() -> None:
            index = next(queue, None)
            if index is not None:
                futures = [(rel, pool.submit(decode_image, path, channels, value_range)) for rel, path in shards[index]]
                pending.append((index, futures))

        for _ in range(cfg.prefetch + 1):
            submit()
        while pending:
            index, futures = pending.popleft()
            items = [(rel, future.result()) for rel, future in futures]
            submit()
            rows, errors = encode_shard(encoder, items, cfg.batch_size, cfg.pooled)
            if written is not None:
                written.result()
            written = writer.submit(write_shard, out, index, rows, errors, cfg.pooled)
            written.add_done_callback(lambda _, n=len(items): bar.update(n))
        if written is not None:
            written.result()
