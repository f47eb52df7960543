"""The ONNX Runtime backend: the exported graphs on the CPU or CUDA execution provider.

Session options are set on purpose:

- ``intra_op_num_threads``: the machine's cores (or ``threads``) for a single image; for batches, one
  single-threaded session per core, each taking chunks of the batch (see ``OnnxRuntimeBackend._run``).
  ``inter_op_num_threads`` 1, sequential execution: a graph is one chain, nothing runs side by side in it.
- Graph optimizations: ``ORT_ENABLE_EXTENDED`` on the CPU (constant folding, fusions; without the NCHWc
  layout of ``ORT_ENABLE_ALL``, slower on these graphs), ``ORT_ENABLE_ALL`` on CUDA.
- Memory (CPU): every session draws from one arena shared by the process (``session.use_env_allocators``),
  which grows by what is asked rather than by powers of two; memory patterns are off (a pattern is planned
  and held per input shape); and after every run the arena hands its free memory back
  (``memory.enable_memory_arena_shrinkage``). So a graph holds at most one image's (or one tile's) working
  set per thread while it runs, and memory falls back between requests: peak memory follows the batch and
  tile budgets of the caller, not what ran before. The shifted copies of a shift-averaged reconstruct run
  one after another inside the graph (``csc_serve.export.graphs``) for the same reason.
- A cached optimized model: the first session saves its optimized graph under ``ort_cache/`` in the artifact
  directory (keyed by ONNX Runtime version, provider and CPU), later sessions load it with optimizations
  off and start faster. A read-only artifact directory just skips the cache.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import platform
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from csc_serve.backends.base import Backend, BackendUnavailable
from csc_serve.export.manifest import GRAPH_NAMES, ArtifactError, artifact_path, verify_manifest
from csc_serve.models import CSCConfig

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
CHUNK = 1  # images per worker call: one image's code maps stay in cache between the elementwise passes


def _ort():
    try:
        import onnxruntime
    except ImportError:
        raise BackendUnavailable('onnxruntime is not installed: pip install -e ".[cpu]" (or ".[gpu]")') from None
    return onnxruntime


def available_providers() -> list[str]:
    """``cpu`` and/or ``cuda``, as this ONNX Runtime build offers them."""
    try:
        offered = _ort().get_available_providers()
    except BackendUnavailable:
        return []
    return [name for name, provider in PROVIDERS.items() if provider in offered]


# ORT_ENABLE_EXTENDED on the CPU: ORT_ENABLE_ALL adds the NCHWc layout, whose reorders around the
# 3-channel convolutions and the elementwise passes cost more than its convolutions save here.
OPTIMIZATION = {
    "cpu": lambda ort: ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "cuda": lambda ort: ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


_arena_lock = threading.Lock()
_arena: list[bool] = []


def _shared_cpu_arena(ort) -> bool:
    """Register the process's shared CPU arena once (growing by what is asked); whether sessions can use it."""
    with _arena_lock:
        if not _arena:
            try:
                memory = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
                # max_mem 0 (no cap), kSameAsRequested (1), default first chunk and dead bytes per chunk
                ort.create_and_register_allocator(memory, ort.OrtArenaCfg(0, 1, -1, -1))
                _arena.append(True)
            except Exception:  # an older runtime without shared allocators: each session keeps its own arena
                _arena.append(False)
        return _arena[0]


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _cpu_fingerprint() -> str:
    """The optimized CPU graph depends on the instruction set: key the cache by the CPU's flags."""
    flags = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        pass
    return hashlib.sha256(f"{platform.machine()} {flags}".encode()).hexdigest()[:12]


class OnnxRuntimeBackend(Backend):
    """The exported graphs in ONNX Runtime. ``precision="float16"`` loads the ``*_fp16`` graphs."""

    name = "onnxruntime"

    def __init__(
        self,
        config: CSCConfig,
        weights_sha256: str,
        artifact_dir: str | os.PathLike,
        provider: str = "cpu",
        precision: str = "float32",
        threads: int | None = None,
        cache: bool = True,
        split_batches: bool = True,
    ):
        ort = _ort()
        if provider not in PROVIDERS:
            raise ValueError(f"provider must be one of {sorted(PROVIDERS)}, got {provider!r}")
        if provider not in available_providers():
            raise BackendUnavailable(f"this onnxruntime build has no {PROVIDERS[provider]}")
        if precision not in ("float32", "float16"):
            raise ValueError(f"precision must be float32 or float16, got {precision!r}")
        super().__init__(config, weights_sha256, provider)
        self.artifact_dir = Path(artifact_dir)
        self.manifest = verify_manifest(self.artifact_dir, weights_sha256, config)
        self.precision = precision
        self.threads = threads or usable_cores()
        graphs = self.manifest.get("onnx", {}).get("graphs", {})
        suffix = "_fp16" if precision == "float16" else ""
        # On the CPU, batches are split over one single-threaded session per core (see _run).
        self.workers = self.threads if split_batches and provider == "cpu" and self.threads > 1 else 1
        self.sessions, self.worker_sessions = {}, {}
        for name in GRAPH_NAMES:
            entry = graphs.get(name + suffix)
            if entry is None:
                hint = " --fp16" if suffix else ""
                raise ArtifactError(f"{self.artifact_dir}: no {name}{suffix} graph (re-export with 'csc export{hint}')")
            path = artifact_path(self.artifact_dir, entry)
            self.sessions[name] = self._session(ort, path, entry["sha256"], provider, cache, self.threads)
            if self.workers > 1:
                self.worker_sessions[name] = [
                    self._session(ort, path, entry["sha256"], provider, cache, 1) for _ in range(self.workers)
                ]
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="ort") if self.workers > 1 else None
        self._run_options = ort.RunOptions()
        if provider == "cpu":  # free arena memory goes back to the system after every run
            self._run_options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")

    def _session(self, ort, path: Path, sha256: str, provider: str, cache: bool, threads: int):
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.log_severity_level = 3
        if provider == "cpu":
            options.enable_mem_pattern = False
            if _shared_cpu_arena(ort):
                options.add_session_config_entry("session.use_env_allocators", "1")
        providers = [PROVIDERS[provider]]
        cached = self._cache_path(ort, path, sha256, provider) if cache else None
        if cached is not None and cached.is_file():
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            try:
                return ort.InferenceSession(str(cached), options, providers=providers)
            except Exception:  # a damaged cache entry: rebuild it below
                cached.unlink(missing_ok=True)
        options.graph_optimization_level = OPTIMIZATION[provider](ort)
        tmp = None
        if cached is not None:
            tmp = cached.with_name(f".{cached.name}.{os.getpid()}.tmp")
            options.optimized_model_filepath = str(tmp)
        session = ort.InferenceSession(str(path), options, providers=providers)
        if tmp is not None and tmp.is_file():
            os.replace(tmp, cached)
        return session

    def _cache_path(self, ort, path: Path, sha256: str, provider: str) -> Path | None:
        directory = self.artifact_dir / "ort_cache"
        try:
            directory.mkdir(exist_ok=True)
        except OSError:
            return None
        if not os.access(directory, os.W_OK):
            return None
        level = str(OPTIMIZATION[provider](ort)).rsplit(".", 1)[-1].lower()
        key = f"{sha256[:16]}-{provider}-{level}-ort{ort.__version__}-{_cpu_fingerprint()}"
        return directory / f"{path.stem}-{key}.onnx"

    @property
    def batches_in_flight(self) -> int:
        """Two on the CPU with worker sessions: they accept concurrent runs, so the next batch starts on a core
        as soon as the previous one has no image left for it (measured: a few per cent more images/s)."""
        return 2 if self.workers > 1 else 1

    def describe(self) -> dict:
        return {
            **super().describe(),
            "precision": self.precision,
            "threads": self.threads,
            "workers": self.workers,
            "artifacts": str(self.artifact_dir),
            "opset": self.manifest.get("onnx", {}).get("opset"),
        }

    def _run(self, graph: str, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        """One image runs on all threads; a batch is cut into chunks of ``CHUNK`` images that the
        single-threaded worker sessions take from one shared counter, so no core idles while another still
        holds work. The graphs are chains of convolutions and elementwise passes over large code maps: one
        image per core keeps them in cache and beats every core on every op (measured: ``csc bench --ablation``)."""
        batch = next(iter(inputs.values())).shape[0]
        if self._pool is None or batch < 2:
            return self.sessions[graph].run(None, inputs, self._run_options)
        sessions = self.worker_sessions[graph]
        parts = self._spread(inputs, lambda worker, first, chunk: sessions[worker].run(None, chunk, self._run_options))
        return [np.concatenate(outputs) for outputs in zip(*parts)]

    def _encode_each(self, inputs: dict[str, np.ndarray], consume) -> list:
        if self._pool is None or inputs["images"].shape[0] < 2:
            return super()._encode_each(inputs, consume)
        encoders = self.worker_sessions["encode"]
        return self._spread(inputs, lambda worker, first, chunk:
                            consume(first, encoders[worker].run(None, chunk, self._run_options)[0]))

    def _spread(self, inputs: dict[str, np.ndarray], work) -> list:
        """``work(worker, first, chunk)`` on every chunk of the batch, by the worker sessions; results in order."""
        batch = next(iter(inputs.values())).shape[0]
        count = max(self.workers, -(-batch // CHUNK))
        bounds = np.linspace(0, batch, count + 1).round().astype(int)
        starts = bounds[:-1].tolist()
        chunks = [{k: v[a:b] for k, v in inputs.items()} for a, b in zip(bounds[:-1], bounds[1:])]
        taken = itertools.count()  # next() on it is atomic: each chunk goes to exactly one worker
        results: list = [None] * len(chunks)

        def run(worker: int) -> None:
            while (index := next(taken)) < len(chunks):
                results[index] = work(worker, starts[index], chunks[index])

        list(self._pool.map(run, range(self.workers)))
        return results
