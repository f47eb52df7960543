"""The TensorRT backend: plans built by ``csc export --tensorrt`` on this GPU, run on torch CUDA memory.

Everything is checked before a plan is deserialized: the manifest names the weights being served, the plans
were built by this TensorRT version for this GPU's compute capability (a plan from elsewhere fails to load,
or on a GPU of another architecture may not run at all), each plan was built from the ONNX graph the
manifest lists, and each plan file has the sha256 recorded for it.

Each graph gets one execution context. A call copies its inputs into torch CUDA tensors, sets the input
shapes, points TensorRT at the tensors' memory and enqueues the plan on the backend's own CUDA stream, then
waits for it. A context holds the shapes of one call at a time, so calls to the same graph take turns (a
lock per graph); different graphs run side by side. Shapes outside the plan's optimization profile are
refused before anything reaches the GPU, with the profile in the message.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from csc_serve.backends.base import Backend, BackendUnavailable
from csc_serve.export.manifest import ArtifactError, artifact_path, verify_manifest
from csc_serve.export.tensorrt import (
    GRAPH_NAMES,
    PRECISIONS,
    Profile,
    TensorRTUnavailable,
    check_tensorrt_section,
    cuda_device,
    import_tensorrt,
)
from csc_serve.models import CSCConfig


def verify_plans(
    directory: str | os.PathLike,
    weights_sha256: str,
    tensorrt_version: str,
    compute_capability: str,
    precision: str = "float32",
    device: str = "",
    config: CSCConfig | None = None,
) -> tuple[dict, dict[str, tuple[Path, dict]]]:
    """The manifest and ``{graph: (plan path, plan entry)}``, every check above passed; ``ArtifactError`` if not."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
    manifest = verify_manifest(directory, weights_sha256, config)
    section = check_tensorrt_section(manifest, tensorrt_version, compute_capability, device)
    onnx_graphs = manifest.get("onnx", {}).get("graphs", {})
    plans = {}
    for graph in GRAPH_NAMES:
        name = graph + PRECISIONS[precision]
        entry = section["plans"].get(name)
        if entry is None:
            hint = " --fp16" if precision == "float16" else ""
            raise ArtifactError(f"{directory}: no {name} TensorRT plan (build it with 'csc export{hint} --tensorrt')")
        if onnx_graphs.get(name, {}).get("sha256") != entry.get("onnx_sha256"):
            raise ArtifactError(
                f"{directory}: {entry.get('file')} was built from another {name} graph than manifest.json lists: "
                "rebuild the plans with 'csc export --tensorrt'"
            )
        plans[graph] = (artifact_path(directory, entry), entry)
    return manifest, plans


def check_in_profile(graph: str, name: str, shape: tuple, low: tuple, high: tuple, profile: Profile) -> None:
    """``ValueError`` naming the profile unless ``low <= shape <= high`` dimension by dimension."""
    shape, low, high = tuple(shape), tuple(low), tuple(high)
    if len(shape) == len(low) and all(lo <= s <= hi for s, lo, hi in zip(shape, low, high)):
        return
    raise ValueError(
        f"{graph}: {name} of shape {shape} is outside the TensorRT profile the plans were built for "
        f"({profile.describe()}; {name} from {low} to {high}); rebuild them for these inputs with "
        "'csc export --tensorrt --trt-batch MIN,OPT,MAX --trt-size HxW,HxW,HxW'"
    )


@dataclass
class _Plan:
    engine: object
    context: object
    inputs: list[str]
    outputs: list[str]  # in the order of the graph's signature (csc_serve.export.graphs)
    profile: Profile
    lock: threading.Lock


class TensorRTBackend(Backend):
    """The exported graphs as TensorRT plans. ``precision="float16"`` loads the ``*_fp16`` plans."""

    name = "tensorrt"

    def __init__(
        self,
        config: CSCConfig,
        weights_sha256: str,
        artifact_dir: str | os.PathLike,
        precision: str = "float32",
    ):
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
        try:
            trt = import_tensorrt()
            gpu = cuda_device()
        except TensorRTUnavailable as err:  # export's own error, in the backend contract's terms
            raise BackendUnavailable(str(err)) from err
        import torch

        super().__init__(config, weights_sha256, "cuda")
        self.artifact_dir = Path(artifact_dir)
        self.precision = precision
        self.gpu = gpu
        self.tensorrt_version = trt.__version__
        self.manifest, plans = verify_plans(
            self.artifact_dir, weights_sha256, trt.__version__, gpu["compute_capability"], precision, gpu["device"],
            config=config,
        )
        self._trt, self._torch = trt, torch
        self._runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self._stream = torch.cuda.Stream()
        self._dtypes = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16,
                        trt.DataType.INT32: torch.int32, trt.DataType.INT64: torch.int64, trt.DataType.BOOL: torch.bool}
        onnx_graphs = self.manifest.get("onnx", {}).get("graphs", {})
        self._plans = {graph: self._load(path, entry, onnx_graphs[graph + PRECISIONS[precision]].get("outputs", []))
                       for graph, (path, entry) in plans.items()}

    def _load(self, path: Path, entry: dict, onnx_outputs: list[dict]) -> _Plan:
        engine = self._runtime.deserialize_cuda_engine(path.read_bytes())
        if engine is None:
            hint = "rebuild it with 'csc export --tensorrt'"
            raise ArtifactError(f"{path}: TensorRT could not load the plan (see its log above); {hint}")
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == self._trt.TensorIOMode.INPUT]
        expected = [spec["name"] for spec in onnx_outputs]
        if sorted(n for n in names if n not in inputs) != sorted(expected):
            raise ArtifactError(f"{path}: expected the output tensors {expected}, the plan has "
                                f"{[n for n in names if n not in inputs]}")
        profile = Profile.from_dict(entry.get("profile"))
        return _Plan(engine, engine.create_execution_context(), inputs, expected, profile, threading.Lock())

    def describe(self) -> dict:
        return {
            **super().describe(),
            "precision": self.precision,
            "artifacts": str(self.artifact_dir),
            "tensorrt": self.tensorrt_version,
            "gpu": self.gpu["device"],
            "compute_capability": self.gpu["compute_capability"],
            "profile": self._plans["encode"].profile.describe(),
        }

    def _dtype(self, engine, name: str):
        dtype = engine.get_tensor_dtype(name)
        if dtype not in self._dtypes:
            raise ArtifactError(f"{self.artifact_dir}: plan tensor {name!r} has type {dtype}, which cannot be fed")
        return self._dtypes[dtype]

    def _to_device(self, array: np.ndarray, dtype):
        host = array if array.flags.writeable else array.copy()  # torch.from_numpy wants writable memory
        return self._torch.from_numpy(host).to("cuda", dtype, non_blocking=True)

    def _run(self, graph: str, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        plan = self._plans[graph]
        for name in plan.inputs:
            if name not in inputs:
                raise ArtifactError(f"{self.artifact_dir}: the {graph} plan takes {plan.inputs}, got {sorted(inputs)}")
            low, _, high = plan.engine.get_tensor_profile_shape(name, 0)
            check_in_profile(graph, name, inputs[name].shape, low, high, plan.profile)
        torch = self._torch
        with plan.lock, torch.cuda.stream(self._stream):
            # The tensors stay referenced until the stream is synchronized: TensorRT reads them asynchronously.
            tensors = {name: self._to_device(inputs[name], self._dtype(plan.engine, name)) for name in plan.inputs}
            for name, tensor in tensors.items():
                if not plan.context.set_input_shape(name, tuple(tensor.shape)):
                    raise ValueError(f"{graph}: TensorRT refused the shape {tuple(tensor.shape)} for {name}")
                plan.context.set_tensor_address(name, tensor.data_ptr())
            outs = []
            for name in plan.outputs:
                shape = tuple(plan.context.get_tensor_shape(name))
                outs.append(torch.empty(shape, dtype=self._dtype(plan.engine, name), device="cuda"))
                plan.context.set_tensor_address(name, outs[-1].data_ptr())
            if not plan.context.execute_async_v3(self._stream.cuda_stream):
                raise RuntimeError(f"{graph}: TensorRT failed to enqueue the plan (see its log)")
            results = [out.to("cpu", torch.float32, non_blocking=False) for out in outs]
            self._stream.synchronize()
        return [result.numpy() for result in results]
