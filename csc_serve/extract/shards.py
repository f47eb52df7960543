"""The on-disk format of ``csc extract``: Parquet shards, ``manifest.json`` and ``errors.jsonl``.

An output directory holds::

    manifest.json          what was extracted and how (below); written atomically at the start and the end
    part-00000.parquet     one shard per ``shard_size`` images of the sorted input list, written atomically
    part-00001.parquet     ...
    errors.jsonl           one {"path": ..., "reason": ...} line per image that could not be read

Columns of a shard (one row per image; one row group per encoded batch, so rows follow the batches: images
of one size in input order)::

    path     string              the image's path relative to the input, POSIX separators
    height   int32, width int32  the image's size in pixels
    shape    list<int32> (3)     (K, h, w) of the code maps of the extracted stage
    indices  list<int32>         flat C-order positions of the non-zero codes in (K, h, w), increasing
    values   list<float32>       the non-zero codes, in the same order
    pooled   list<float32> (K)   mean of |codes| over the h*w positions of each atom (when pooling is on)

Why Parquet: columnar, compressed, readable from pyarrow, pandas, polars, DuckDB and Spark alike, and the
format Ray Data reads and writes natively. The reasons images could not be read travel inside their shard
(file metadata key ``csc_errors``), so a shard and its errors appear together or not at all.

Resuming: shard ``i`` always holds images ``i*shard_size .. (i+1)*shard_size - 1`` of the sorted input
list, batched the same way inside, so a shard that exists is finished and a redone shard is bit-identical.
A run killed while writing leaves only a hidden temporary file, which ``remove_partial_files`` deletes.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from csc_serve.models.serialization import atomic_write, commit_file, read_json_document

FORMAT = "csc-features"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
ERRORS_NAME = "errors.jsonl"
ERRORS_KEY = b"csc_errors"
POOLING = "mean_abs"  # pooled[k] = mean over positions of |codes[k]|


class FeatureFormatError(ValueError):
    """An output directory that is not (or no longer) a readable ``csc extract`` result."""


@dataclass(frozen=True)
class Features:
    """One image's sparse codes: ``dense()`` gives the ``(K, h, w)`` float32 maps."""

    height: int
    width: int
    shape: tuple[int, int, int]
    indices: np.ndarray  # int32 (N,)
    values: np.ndarray  # float32 (N,)
    pooled: np.ndarray | None  # float32 (K,)

    def dense(self) -> np.ndarray:
        codes = np.zeros(int(np.prod(self.shape)), np.float32)
        codes[self.indices] = self.values
        return codes.reshape(self.shape)


def shard_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


def inputs_sha256(relative_paths: list[str]) -> str:
    """A hash of the sorted input list: a resumed run must see the same images."""
    return hashlib.sha256("\n".join(relative_paths).encode()).hexdigest()


def sparse_row(path: str, size: tuple[int, int], codes: np.ndarray, pooled: bool) -> dict[str, Any]:
    """One shard row from ``(K, h, w)`` codes."""
    flat = codes.reshape(-1)
    if flat.size >= 2**31:
        raise ValueError(f"{path}: {flat.size} codes exceed the int32 indices of the feature format")
    indices = np.flatnonzero(flat != 0)  # numpy's nonzero is several times faster on a boolean mask
    row = {
        "path": path,
        "height": int(size[0]),
        "width": int(size[1]),
        "shape": [int(n) for n in codes.shape],
        "indices": indices.astype(np.int32),
        "values": flat[indices].astype(np.float32, copy=False),
    }
    if pooled:  # one pass over the maps (pairwise float32 sums) beats a scatter of the non-zero values
        row["pooled"] = np.abs(codes).reshape(codes.shape[0], -1).mean(axis=1, dtype=np.float32)
    return row


LIST_COLUMNS = {"indices": np.int32, "values": np.float32, "pooled": np.float32}
# Sorted positions delta-encode to a few bits each; byte-stream split lets zstd find the floats' common
# exponent bytes; dictionaries only cost time on these columns. (Keys are leaf paths: list columns end in
# ".list.element".)
ENCODINGS = {"indices.list.element": "DELTA_BINARY_PACKED", "values.list.element": "BYTE_STREAM_SPLIT"}


def _schema(pooled: bool):
    import pyarrow as pa

    fields = [
        ("path", pa.string()), ("height", pa.int32()), ("width", pa.int32()), ("shape", pa.list_(pa.int32(), 3)),
        ("indices", pa.list_(pa.int32())), ("values", pa.list_(pa.float32())),
    ]
    if pooled:
        fields.append(("pooled", pa.list_(pa.float32())))
    return pa.schema(fields)


def _table(rows: list[dict], schema):
    """Rows as a table whose list columns have one chunk per row, each a zero-copy view of that row's array:
    nothing is concatenated, and the Parquet writer takes chunked columns as they are."""
    import pyarrow as pa

    columns = []
    for name in schema.names:
        if name in LIST_COLUMNS:
            dtype = LIST_COLUMNS[name]
            chunks = [pa.ListArray.from_arrays(np.array([0, row[name].size], np.int32),
                                               row[name].astype(dtype, copy=False)) for row in rows]
            columns.append(pa.chunked_array(chunks, schema.field(name).type))
        else:
            columns.append(pa.chunked_array([pa.array([row[name] for row in rows], schema.field(name).type)]))
    return pa.Table.from_arrays(columns, schema=schema)


class ShardWriter:
    """Shard ``index`` written as its batches come, each a row group, into a hidden temporary file beside it;
    ``close`` stores the shard's errors in the footer, fsyncs and renames the file to the shard's name. Until
    then the shard does not exist: a run killed before leaves only the temporary file, which
    ``remove_partial_files`` deletes. Memory stays at one batch's rows, whatever the shard size."""

    def __init__(self, out: Path, index: int, pooled: bool):
        import pyarrow.parquet as pq

        self.path = Path(out) / shard_name(index)
        self.schema = _schema(pooled)
        fd, self.tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=out)
        os.close(fd)
        try:
            self.writer = pq.ParquetWriter(self.tmp, self.schema, compression="zstd", use_dictionary=False,
                                           column_encoding=ENCODINGS)
        except BaseException:
            Path(self.tmp).unlink(missing_ok=True)
            raise
        self.rows = 0

    def write(self, rows: list[dict]) -> None:
        if rows:
            self.writer.write_table(_table(rows, self.schema))
            self.rows += len(rows)

    def close(self, errors: list[dict]) -> Path:
        try:
            self.writer.add_key_value_metadata({ERRORS_KEY.decode(): json.dumps(errors)})
            self.writer.close()
            commit_file(self.tmp, self.path)
        except BaseException:
            self.abort()
            raise
        return self.path

    def abort(self) -> None:
        """Drop the unfinished shard (its temporary file)."""
        try:
            self.writer.close()
        except Exception:  # already closed, or the disk is what failed: the file goes either way
            pass
        Path(self.tmp).unlink(missing_ok=True)


def finished_shards(out: Path) -> set[int]:
    """Indices of the shards already written in ``out``."""
    done = set()
    for path in out.glob("part-*.parquet"):
        stem = path.name[len("part-") : -len(".parquet")]
        if stem.isdigit():
            done.add(int(stem))
    return done


def remove_partial_files(out: Path) -> list[Path]:
    """Delete the temporary files a killed run left behind (never a finished shard)."""
    removed = []
    for path in out.glob(".*.tmp"):
        path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def shard_summary(path: Path) -> dict:
    """``{"file", "rows", "errors"}`` of a finished shard, read from its footer only."""
    import pyarrow.parquet as pq

    meta = pq.read_metadata(path)
    errors = json.loads((meta.metadata or {}).get(ERRORS_KEY, b"[]"))
    return {"file": path.name, "rows": meta.num_rows, "errors": errors}


def read_manifest(out: Path) -> dict:
    return read_json_document(Path(out) / MANIFEST_NAME, FORMAT, FORMAT_VERSION, FeatureFormatError, "manifest",
                              "not a 'csc extract' output directory")


def write_manifest(out: Path, manifest: dict) -> None:
    text = json.dumps(manifest, indent=2) + "\n"
    atomic_write(Path(out) / MANIFEST_NAME, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def finish(out: Path, manifest: dict, num_shards: int) -> dict:
    """Gather every shard's counts and errors into ``errors.jsonl`` and the final manifest."""
    shards = [shard_summary(out / shard_name(i)) for i in range(num_shards)]
    errors = [error for shard in shards for error in shard["errors"]]
    lines = "".join(json.dumps(error) + "\n" for error in errors)
    atomic_write(out / ERRORS_NAME, lambda tmp: Path(tmp).write_text(lines, encoding="utf-8"))
    manifest = {
        **manifest,
        "complete": True,
        "counts": {
            "images": manifest["counts"]["images"],
            "encoded": sum(shard["rows"] for shard in shards),
            "errors": len(errors),
            "shards": num_shards,
        },
        "shards": [{"file": shard["file"], "rows": shard["rows"], "errors": len(shard["errors"])} for shard in shards],
    }
    write_manifest(out, manifest)
    return manifest


def load_features(out: str | Path) -> dict[str, Features]:
    """Every image's features in a finished output directory, keyed by its path relative to the input."""
    import pyarrow.parquet as pq

    out = Path(out)
    manifest = read_manifest(out)
    if not manifest.get("complete"):
        raise FeatureFormatError(f"{out}: the extraction is not finished (re-run it with --resume)")
    features: dict[str, Features] = {}
    for shard in manifest["shards"]:
        table = pq.read_table(out / shard["file"])
        paths = table.column("path").to_pylist()
        heights, widths = (table.column(name).to_numpy().tolist() for name in ("height", "width"))
        shapes = np.asarray(table.column("shape").combine_chunks().flatten(), np.int64).reshape(-1, 3)
        indices, values = _rows_of(table, "indices", np.int32), _rows_of(table, "values", np.float32)
        pooled = _rows_of(table, "pooled", np.float32) if "pooled" in table.column_names else [None] * len(paths)
        for i, path in enumerate(paths):
            if path in features:
                raise FeatureFormatError(f"{out}: {path} appears in more than one shard")
            features[path] = Features(height=heights[i], width=widths[i], shape=tuple(shapes[i].tolist()),
                                      indices=indices[i], values=values[i], pooled=pooled[i])
    return features


def _rows_of(table, name: str, dtype) -> list[np.ndarray]:
    """The per-row arrays of a variable-length list column, as views of one flat numpy buffer."""
    column = table.column(name).combine_chunks()
    offsets = column.offsets.to_numpy()
    flat = np.array(column.flatten().to_numpy(zero_copy_only=False), dtype)  # writable, owned by numpy
    return [flat[a - offsets[0] : b - offsets[0]] for a, b in zip(offsets[:-1], offsets[1:])]
