"""The Ray Data engine of ``csc extract``: the same shards as the local engine, encoded by a pool of actors.

Each row of the dataset is one shard (its index and its images); ``map_batches`` hands one shard at a time
to a ``ShardEncoder`` actor, which holds a backend for its whole life, decodes the shard's images with a few
threads, encodes them exactly as the local engine does (``csc_serve.extract.encode.encode_shard``) and writes the
shard atomically into the output directory, batch by batch. The driver only plans, counts and writes the
manifest. So the output is identical to a local run's, and ``--resume`` works across engines.

On a cluster every node must see the input images, the output directory and the model at the same paths (a
shared filesystem: NFS, Lustre, a FUSE-mounted bucket); connect with ``ray_address="auto"`` from a cluster
node, or ``ray://head:10001``. The actors get the model as the driver resolved it: a bundled model by name,
a model directory by its absolute path, a model-store tag by the stored directory (and its artifacts) the tag
named when the run started, so every actor encodes with the same version even if ``name:latest`` moves on
(on a cluster, ``$BENTOML_HOME`` must then be on the shared filesystem too). Ray is an optional extra
(``pip install 'csc-serve[ray]'``), imported only here.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from csc_serve.extract.encode import StageEncoder, decoded, encode_shard
from csc_serve.extract.shards import ShardWriter


class ShardEncoder:
    """A Ray Data actor: decodes, encodes and writes whole shards; returns one summary row per shard."""

    def __init__(self, model: str, stage: int | None, backend: str, lmbda_scale: float, batch: tuple[int, int],
                 pooled: bool, out: str, prefetch: int, decode_threads: int = 2, artifacts: str | None = None):
        self.encoder = StageEncoder(model, stage, backend, lmbda_scale, artifacts)
        self.batch, self.pooled, self.out = tuple(batch), pooled, Path(out)
        self.prefetch, self.decode_threads = prefetch, decode_threads
        self.pool = ThreadPoolExecutor(decode_threads, thread_name_prefix="csc-decode")

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        config = self.encoder.config
        indices, rows, errors = [], [], []
        for index, relatives, paths in zip(batch["index"], batch["relative"], batch["path"]):
            relatives, paths = [str(r) for r in relatives], [str(p) for p in paths]
            items = decoded(zip(relatives, paths), self.pool, self.decode_threads, config.in_channels,
                            config.value_range, self.prefetch * self.batch[0],
                            self.prefetch * self.batch[1])
            shard = ShardWriter(self.out, int(index), self.pooled)
            try:
                shard_errors = encode_shard(self.encoder, items, self.batch, self.pooled, shard.write)
                shard.close(shard_errors)
            except BaseException:
                shard.abort()
                raise
            indices.append(int(index))
            rows.append(shard.rows)
            errors.append(len(shard_errors))
        return {"index": np.array(indices), "rows": np.array(rows), "errors": np.array(errors)}


def require_ray():
    """The ``ray`` module with Ray Data, or a one-line error saying how to install it."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        from csc_serve.backends import BackendUnavailable

        raise BackendUnavailable("the ray engine needs Ray Data: pip install 'csc-serve[ray]'") from None
    return ray


def actor_model(source) -> tuple[str, str | None]:
    """``(model, artifacts)`` for the actors, from the driver's ``ModelSource`` (see the module docstring)."""
    artifacts = None if source.artifacts is None else str(source.artifacts.resolve())
    if source.kind == "bundled":
        return source.reference, artifacts
    return str(source.directory.resolve()), artifacts


def run_ray(cfg, shards: list, todo: list[int], bar, source) -> None:
    """Encode the shards ``todo`` on Ray Data; ``bar`` counts images as their shards are written. ``source``:
    the ``ModelSource`` the driver resolved ``cfg.model`` to."""
    ray = require_ray()
    if not todo:
        return
    if not ray.is_initialized():
        ray.init(address=cfg.ray_address, log_to_driver=False, include_dashboard=False)
    items = [
        {"index": i, "relative": [rel for rel, _ in shards[i]], "path": [str(Path(p).resolve()) for _, p in shards[i]]}
        for i in todo
    ]
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    dataset = ray.data.from_items(items, override_num_blocks=len(items))
    model, artifacts = actor_model(source)
    summaries = dataset.map_batches(
        ShardEncoder,
        fn_constructor_kwargs=dict(
            model=model, artifacts=artifacts, stage=cfg.stage, backend=cfg.backend, lmbda_scale=cfg.lmbda_scale,
            batch=(cfg.batch_size, cfg.batch_pixels),
            pooled=cfg.pooled, out=str(Path(cfg.out).resolve()), prefetch=cfg.prefetch,
        ),
        batch_size=1,  # one shard per call: a shard is the unit that is written, and redone, whole
        concurrency=min(cfg.ray_actors, len(items)),
        num_cpus=1,
    )
    for summary in summaries.iter_rows():
        bar.update(int(summary["rows"]) + int(summary["errors"]))
