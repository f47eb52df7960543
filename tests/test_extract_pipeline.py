"""The extraction pipeline's parts: codes handed over as they are made, batches formed while images arrive,
batches in flight, the shard encodings, the end-to-end bench, and the ray engine's absence."""

import json
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from csc_serve.backends import load_backend
from csc_serve.cli.main import main
from csc_serve.extract import ExtractConfig, load_features, run_extract
from csc_serve.extract.encode import encode_shard
from csc_serve.extract.shards import sparse_row

from .extract_fixtures import assert_same_features, make_images, save_tiny_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CSC_CACHE_DIR", str(path))
        yield save_tiny_model(tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(3)
    return rng.random((7, 3, 16, 24), dtype=np.float32)


@pytest.mark.parametrize("name", ["onnxruntime-cpu", "torch"])
def test_encode_each_hands_every_image_over_once_in_order(model_dir, images, name):
    backend = load_backend(str(model_dir), name)
    seen, threads = [], set()

    def consume(first, codes):
        threads.add(threading.get_ident())
        seen.append((first, len(codes)))
        return first, codes.copy()

    parts = backend.encode_each(images, 0.5, consume)
    covered = sorted(i for first, n in seen for i in range(first, first + n))
    assert covered == list(range(len(images)))  # each image exactly once
    assert [first for first, _ in parts] == sorted(first for first, _ in parts)  # results in image order
    np.testing.assert_array_equal(np.concatenate([codes for _, codes in parts]), backend.encode(images, 0.5))
    if name == "onnxruntime-cpu" and backend.workers > 1:
        assert threading.get_ident() not in threads  # made into rows by the worker threads


class RecordingEncoder:
    """Stands in for StageEncoder: records each batch (image ids) and how many items had arrived by then."""

    def __init__(self, arrived):
        self.batches, self.arrived, self.lock = [], arrived, threading.Lock()

    def encode_each(self, batch, consume):
        with self.lock:
            self.batches.append(([int(image[0, 0, 0]) for image in batch], self.arrived[0]))
        codes = np.repeat(batch[:, :1], 2, axis=1)  # (B, 2, h, w), non-zero
        return [consume(0, codes)]


def _items(sizes, arrived, unreadable=()):
    for i, (h, w) in enumerate(sizes):
        arrived[0] = i + 1
        yield (f"img{i}.png", f"unreadable {i}") if i in unreadable else (f"img{i}.png", np.full((1, h, w), i + 1.0))


SIZES = [(4, 4), (4, 6), (4, 4), (4, 4), (4, 6), (4, 4), (4, 4), (4, 6)]


class RecordingRunner(ThreadPoolExecutor):
    """Records how many items had arrived when each batch was handed to the runner."""

    def __init__(self, arrived):
        super().__init__(2)
        self.arrived, self.submitted = arrived, []

    def submit(self, fn, batch, *args):
        self.submitted.append(([int(image[0, 0, 0]) for image in batch], self.arrived[0]))
        return super().submit(fn, batch, *args)


@pytest.mark.parametrize("in_flight", [1, 2])
def test_batches_are_formed_by_size_in_input_order_as_images_arrive(in_flight):
    arrived = [0]
    encoder = RecordingEncoder(arrived)
    pool = RecordingRunner(arrived) if in_flight > 1 else None
    sunk = []
    errors = encode_shard(encoder, _items(SIZES, arrived, unreadable={6}), (2, 10**6), True, sunk.append, pool,
                          in_flight)
    started = pool.submitted if pool else encoder.batches
    # images 1.. by size: 4x4 -> 1, 3, 4, 6, (7 unreadable); 4x6 -> 2, 5, 8; batches in the order they fill
    assert [ids for ids, _ in started] == [[1, 3], [2, 5], [4, 6], [8]]
    by_ids = {tuple(ids): when for ids, when in started}
    assert by_ids[(1, 3)] == 3 and by_ids[(2, 5)] == 5  # started as soon as full, not at the shard's end
    # rows reach the sink batch by batch, in the order the batches were formed, however they finish
    assert [[row["path"] for row in rows] for rows in sunk] == [
        ["img0.png", "img2.png"], ["img1.png", "img4.png"], ["img3.png", "img5.png"], ["img7.png"]]
    assert errors == [{"path": "img6.png", "reason": "unreadable 6"}]
    if pool:
        pool.shutdown()


def test_a_batch_also_ends_at_the_pixel_budget():
    arrived = [0]
    encoder = RecordingEncoder(arrived)
    sizes = [(4, 4), (8, 8), (4, 4), (8, 8), (4, 4), (8, 8)]  # 16 and 64 pixels
    encode_shard(encoder, _items(sizes, arrived), (3, 100), True, lambda rows: None)
    # 4x4: three make a batch (48 px < 100); 8x8: two make 128 px >= 100
    assert [ids for ids, _ in encoder.batches] == [[2, 4], [1, 3, 5], [6]]


def test_decoding_runs_ahead_by_pixels_not_only_by_images(tmp_path):
    from csc_serve.extract.encode import decoded

    class CountingPool(ThreadPoolExecutor):
        def __init__(self):
            super().__init__(1)
            self.submitted = 0

        def submit(self, *args):
            self.submitted += 1
            return super().submit(*args)

    paths = []
    for i, side in enumerate([8] * 6 + [64] * 6):
        paths.append((f"{i}.png", str(tmp_path / f"{i}.png")))
        Image.fromarray(np.zeros((side, side, 3), np.uint8)).save(paths[-1][1])
    with CountingPool() as pool:
        ahead = []
        for i, (relative, image) in enumerate(decoded(iter(paths), pool, 1, 3, (0.0, 1.0), 4, 2 * 64 * 64)):
            assert relative == f"{i}.png" and image.shape[0] == 3
            ahead.append(pool.submitted - (i + 1))
    assert max(ahead[:5]) == 3  # small images: images_ahead, less the one in hand
    assert max(ahead[9:]) <= 1  # 64x64: the pixel budget (two of them) bounds it


def test_batches_in_flight_give_the_same_rows(model_dir, images):
    from csc_serve.extract.encode import StageEncoder

    encoder = StageEncoder(str(model_dir), None, "onnxruntime-cpu")
    items = [(f"img{i}.png", image) for i, image in enumerate(images)]
    alone, together = [], []
    encode_shard(encoder, iter(items), (2, 10**6), True, alone.extend)
    with ThreadPoolExecutor(2) as runner:
        encode_shard(encoder, iter(items), (2, 10**6), True, together.extend, runner, 2)
    assert [r["path"] for r in alone] == [r["path"] for r in together] == [name for name, _ in items]
    for a, b in zip(alone, together):
        for key in ("indices", "values", "pooled"):
            np.testing.assert_array_equal(a[key], b[key])


def test_sparse_row_pools_mean_absolute_codes():
    codes = np.zeros((3, 4, 5), np.float32)
    codes[0, 1, 2], codes[2, 3, 4], codes[2, 0, 0] = -2.0, 1.5, 0.25
    row = sparse_row("x.png", (4, 5), codes, pooled=True)
    np.testing.assert_array_equal(row["indices"], np.flatnonzero(codes))
    np.testing.assert_array_equal(row["values"], [-2.0, 0.25, 1.5])
    np.testing.assert_allclose(row["pooled"], [2.0 / 20, 0.0, 1.75 / 20])
    assert row["indices"].dtype == np.int32 and row["values"].dtype == np.float32


def test_shards_are_written_batch_by_batch_delta_packed_and_byte_split(tmp_path, model_dir):
    make_images(tmp_path / "in", count=4, bad=False)
    run_extract(ExtractConfig(str(model_dir), str(tmp_path / "in"), str(tmp_path / "out"), batch_size=1,
                              progress=False))
    meta = pq.ParquetFile(next((tmp_path / "out").glob("part-*.parquet"))).metadata
    assert meta.num_rows == 4 and meta.num_row_groups == 4  # one row group per batch: memory of one batch
    encodings = {meta.row_group(0).column(i).path_in_schema: meta.row_group(0).column(i).encodings
                 for i in range(meta.num_columns)}
    assert "DELTA_BINARY_PACKED" in encodings["indices.list.element"]
    assert "BYTE_STREAM_SPLIT" in encodings["values.list.element"]
    assert meta.row_group(0).column(0).compression == "ZSTD"


def test_a_failure_inside_a_shard_leaves_neither_the_shard_nor_a_temporary_file(tmp_path, model_dir,
                                                                                 monkeypatch):
    import csc_serve.extract.encode as encode  # where the rows are made

    make_images(tmp_path / "in", count=6, bad=False)
    made = []

    def failing(path, size, codes, pooled):
        made.append(path)
        if len(made) == 5:
            raise OSError("disk full")
        return sparse_row(path, size, codes, pooled)

    monkeypatch.setattr(encode, "sparse_row", failing)
    cfg = ExtractConfig(str(model_dir), str(tmp_path / "in"), str(tmp_path / "out"), batch_size=1, shard_size=4,
                        progress=False)
    with pytest.raises(OSError, match="disk full"):
        run_extract(cfg)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["manifest.json", "part-00000.parquet"]


def test_a_run_killed_while_it_finishes_resumes(tmp_path, model_dir, monkeypatch):
    """The manifest is rewritten last: a failure there leaves the shards, and --resume completes the run."""
    import csc_serve.extract.run as driver  # where the manifest is finished

    make_images(tmp_path / "in", count=5)
    cfg = ExtractConfig(str(model_dir), str(tmp_path / "in"), str(tmp_path / "out"), shard_size=2, progress=False)
    reference = tmp_path / "reference"
    run_extract(ExtractConfig(**{**cfg.__dict__, "out": str(reference)}))

    def killed(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(driver, "finish", killed)
    with pytest.raises(KeyboardInterrupt):
        run_extract(cfg)
    monkeypatch.undo()
    assert not json.loads((tmp_path / "out" / "manifest.json").read_text())["complete"]
    run_extract(ExtractConfig(**{**cfg.__dict__, "resume": True}))
    assert_same_features(load_features(tmp_path / "out"), load_features(reference))


def test_ray_engine_without_ray_is_a_one_line_error_before_anything_is_written(tmp_path, model_dir, capsys,
                                                                                 monkeypatch):
    make_images(tmp_path / "in", count=2, bad=False)
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    code = main(["extract", str(model_dir), str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--engine", "ray",
                 "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 1 and "pip install 'csc-serve[ray]'" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_bench_extract_reports_both_rates_and_the_ratio(tmp_path, model_dir, capsys):
    make_images(tmp_path / "in", count=6)
    report_path = tmp_path / "bench.json"
    code = main(["bench", str(model_dir), "--extract", str(tmp_path / "in"), "--repeats", "2", "--min-time", "0.05",
                 "--extract-batch", "2", "--extract-shard", "3", "--json", str(report_path)])
    assert code == 0
    report = json.loads(report_path.read_text())
    assert report["images"] == 6 and report["unreadable"] == 2 and report["repeats"] == 2
    for key in ("raw_collection_images_per_s", "raw_repeated_batch_images_per_s", "extract_images_per_s"):
        assert len(report[key]) == 2 and min(report[key]) > 0
    raw = max(np.median(report["raw_collection_images_per_s"]), np.median(report["raw_repeated_batch_images_per_s"]))
    assert report["ratio"] == pytest.approx(np.median(report["extract_images_per_s"]) / raw)
    assert report["ok"] == (report["ratio"] >= 0.8)
    out = capsys.readouterr().out
    assert "csc extract, end to end" in out and "ratio" in out


def test_the_extract_modules_import_in_one_direction():
    """encode is shared by the driver (run) and the Ray engine; neither imports the other back, and the driver
    imports nothing above it (cli, bench)."""
    import ast
    from pathlib import Path

    import csc_serve.extract as package

    def imported(name: str) -> set[str]:
        tree = ast.parse((Path(package.__file__).parent / f"{name}.py").read_text())
        found = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                found.add(node.module)
            elif isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
        return found

    assert not {m for m in imported("encode") if m.startswith("csc_serve.extract.") and m.endswith(("run", "ray"))}
    assert "csc_serve.extract.run" not in imported("ray")
    assert not {m for m in imported("run") if m.startswith(("csc_serve.cli", "csc_serve.bench"))}
