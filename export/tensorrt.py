"""TensorRT plans built from the exported ONNX graphs, on and for this machine's GPU.

A plan is compiled code for one TensorRT version and one GPU architecture, so the manifest's ``tensorrt``
section records both, with the profile, precision and source ONNX of every plan::

    "tensorrt": {"version": "10.3.0", "device": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0",
                 "timing_cache": "trt_timing.cache",
                 "plans": {"encode": {"file": "encode.plan", "sha256": "...", "precision": "float32",
                                      "profile": {"batch": [1, 4, 16], "height": [...], "width": [...]},
                                      "onnx": "encode.onnx", "onnx_sha256": "..."}, "encode_fp16": {...}, ...}}

and ``check_tensorrt_section`` refuses plans from another TensorRT or another architecture, naming both.

Precision is chosen so a plan computes what the ONNX graph it came from computes (whose parity against torch
the manifest records). float32 plans are built with TF32 off: the unrolled FISTA chains tens of
convolutions, and TF32's 10-bit mantissa would put errors of order 1e-3 into codes float32 gets to 1e-6.
float16 plans come from the exported float16 graphs (``*_fp16.onnx``, float16 inside, float32 at the
boundary) parsed into a strongly typed network, where every tensor keeps the type the ONNX gives it. The
alternative on TensorRT 10, the float32 graph with ``BuilderFlag.FP16``, lets the builder pick each layer's
precision by speed, so results change with tactic choice from build to build; TensorRT 11 has only strongly
typed networks and no such flag, and the same build code serves both.

Each plan has one optimization profile: batch, height and width between a minimum and a maximum, kernels
tuned for an ``opt`` shape. Heights and widths are the images'; the decode graph's ``codes`` input gets them
divided by the total stride, and ``lmbda_scale`` follows the batch. The builder's timing cache is kept in a
file and reused, so rebuilding (the other precision, another profile) does not re-time every kernel.
"""

from __future__ import annotations

import argparse
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from csc_serve.models.serialization import atomic_write, sha256_file

from .manifest import GRAPH_NAMES, ArtifactError, ExportError, artifact_path, read_manifest, write_manifest
from .trt_ops import check_tensorrt_compatible

PRECISIONS = {"float32": "", "float16": "_fp16"}  # precision -> suffix of the graph and plan names
INSTALL_HINT = 'pip install -e ".[gpu]"'
TIMING_CACHE_NAME = "trt_timing.cache"
DEFAULT_BATCH = "1,4,16"
DEFAULT_SIZE = "64x64,256x256,512x512"


class TensorRTUnavailable(ExportError):
    """TensorRT is not installed, or there is no CUDA GPU to build or run plans on (the TensorRT backend
    raises it as ``BackendUnavailable``)."""


class TensorRTMismatch(ArtifactError):
    """Plans built by another TensorRT version, or for another GPU architecture."""


class TensorRTBuildError(ExportError):
    """A graph TensorRT cannot parse, or a build that failed."""


# ----------------------------------------------------------------------------- profiles
@dataclass(frozen=True)
class Profile:
    """The input shapes a plan accepts: ``(min, opt, max)`` of the batch, the image height and the width."""

    batch: tuple[int, int, int] = (1, 4, 16)
    height: tuple[int, int, int] = (64, 256, 512)
    width: tuple[int, int, int] = (64, 256, 512)

    def __post_init__(self) -> None:
        for name in ("batch", "height", "width"):
            values = getattr(self, name)
            if len(values) != 3 or any(isinstance(v, bool) or not isinstance(v, int) for v in values):
                raise ValueError(f"{name} needs three integers (min, opt, max), got {values!r}")
            if min(values) < 1:
                raise ValueError(f"{name} values must be positive, got {','.join(map(str, values))}")
            if not values[0] <= values[1] <= values[2]:
                raise ValueError(f"{name} needs min <= opt <= max, got {','.join(map(str, values))}")
            object.__setattr__(self, name, tuple(values))

    def check_stride(self, stride: int) -> None:
        """Graph inputs are stride-aligned, so a profile whose sizes are not could never be used whole."""
        bad = [f"{h}x{w}" for h, w in zip(self.height, self.width) if h % stride or w % stride]
        if bad:
            raise ValueError(f"sizes {', '.join(bad)} are not multiples of the model's total stride {stride}")

    def describe(self) -> str:
        (b0, b1, b2), (h0, h1, h2), (w0, w1, w2) = self.batch, self.height, self.width
        return f"batch {b0}..{b2} (opt {b1}), size {h0}x{w0}..{h2}x{w2} (opt {h1}x{w1})"

    def to_dict(self) -> dict[str, list[int]]:
        return {"batch": list(self.batch), "height": list(self.height), "width": list(self.width)}

    @classmethod
    def from_dict(cls, data: Any) -> Profile:
        try:
            return cls(**{key: tuple(data[key]) for key in ("batch", "height", "width")})
        except (KeyError, TypeError, ValueError) as err:
            raise ArtifactError(f"malformed TensorRT profile in the manifest: {data!r} ({err})") from None


def _positive(flag: str, text: str) -> int:
    if not text.strip().isdigit() or int(text) < 1:
        raise ValueError(f"{flag}: {text!r} is not a positive whole number")
    return int(text)


def _size(flag: str, text: str) -> tuple[int, int]:
    parts = text.lower().split("x")
    if len(parts) not in (1, 2) or not all(p.strip() for p in parts):
        raise ValueError(f"{flag}: {text!r} is not HEIGHTxWIDTH (as in 256x256) or one number for a square")
    values = [_positive(flag, p.strip()) for p in parts]
    return (values[0], values[-1])


def _triple(flag: str, text: str, parse: Callable[[str, str], Any]) -> tuple:
    parts = [p.strip() for p in str(text).split(",")]
    if len(parts) not in (1, 3) or not all(parts):
        raise ValueError(f"{flag} {text!r}: give MIN,OPT,MAX (three comma-separated values), or one for a fixed shape")
    values = [parse(flag, p) for p in parts]
    return tuple(values * 3 if len(values) == 1 else values)


def parse_profile(batch: str = DEFAULT_BATCH, size: str = DEFAULT_SIZE, stride: int | None = None) -> Profile:
    """A ``Profile`` from ``--trt-batch 1,8,32 --trt-size 64x64,256x256,1024x1024`` (min,opt,max each).

    One value instead of three fixes that dimension; a size is ``HEIGHTxWIDTH`` or one number for a square.
    With ``stride``, every size must be a multiple of it. Raises ``ValueError`` naming the flag at fault.
    """
    batches = _triple("--trt-batch", batch, _positive)
    sizes = _triple("--trt-size", size, _size)
    try:
        profile = Profile(batch=batches, height=tuple(h for h, _ in sizes), width=tuple(w for _, w in sizes))
        if stride is not None:
            profile.check_stride(stride)
    except ValueError as err:
        raise ValueError(f"TensorRT profile --trt-batch {batch} --trt-size {size}: {err}") from None
    return profile


def input_shapes(profile: Profile, inputs: list[dict], stride: int) -> dict[str, tuple[tuple[int, ...], ...]]:
    """``{input name: (min shape, opt shape, max shape)}`` for a graph, from its manifest input specs.

    Axes are named as the exporter names them: ``batch``, ``height``/``width`` (images) and
    ``code_height``/``code_width`` (codes, the image size over ``stride``); numbers are fixed sizes.
    """
    profile.check_stride(stride)
    axes = {"batch": profile.batch, "height": profile.height, "width": profile.width,
            "code_height": tuple(h // stride for h in profile.height),
            "code_width": tuple(w // stride for w in profile.width)}
    shapes = {}
    for spec in inputs:
        dims = []
        for axis in spec["shape"]:
            if isinstance(axis, int) and not isinstance(axis, bool):
                dims.append((axis, axis, axis))
            elif axis in axes:
                dims.append(axes[axis])
            else:
                raise ArtifactError(f"input {spec['name']!r}: no profile for the axis {axis!r}")
        shapes[spec["name"]] = tuple(tuple(d[level] for d in dims) for level in range(3))
    return shapes


# ----------------------------------------------------------------------------- the runtime here
def import_tensorrt():
    """The ``tensorrt`` module (10 or newer), or ``TensorRTUnavailable`` saying how to install it."""
    try:
        import tensorrt
    except ImportError as err:
        hint = f"{INSTALL_HINT} on a machine with an NVIDIA GPU"
        raise TensorRTUnavailable(f"TensorRT is not installed ({err}): {hint}") from None
    if int(tensorrt.__version__.split(".")[0]) < 10:
        raise TensorRTUnavailable(f"TensorRT {tensorrt.__version__} is too old, plans need 10 or newer: {INSTALL_HINT}")
    return tensorrt


def cuda_device() -> dict[str, str]:
    """Name and compute capability (``"major.minor"``) of the current CUDA GPU."""
    import torch

    if not torch.cuda.is_available():
        raise TensorRTUnavailable(
            f"TensorRT needs a CUDA GPU and torch {torch.__version__} sees none: use a CUDA build of torch "
            f"on a machine with an NVIDIA GPU, and {INSTALL_HINT}"
        )
    index = torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(index)
    return {"device": torch.cuda.get_device_name(index), "compute_capability": f"{major}.{minor}"}


def check_tensorrt_section(manifest: dict, tensorrt_version: str, compute_capability: str, device: str = "") -> dict:
    """The manifest's ``tensorrt`` section, refused unless its plans come from this TensorRT for this GPU."""
    section = manifest.get("tensorrt")
    if not isinstance(section, dict) or not isinstance(section.get("plans"), dict) or not section["plans"]:
        hint = "build them with 'csc export MODEL --out DIR --tensorrt'"
        raise ArtifactError(f"manifest.json lists no TensorRT plans: {hint}")
    built, built_cc = section.get("version"), section.get("compute_capability")
    if built != tensorrt_version:
        raise TensorRTMismatch(
            f"the TensorRT plans were built with TensorRT {built}, but this is TensorRT {tensorrt_version}: "
            "plans only load in the version that built them; rebuild with 'csc export --tensorrt'"
        )
    if built_cc != compute_capability:
        here = f" ({device})" if device else ""
        raise TensorRTMismatch(
            f"the TensorRT plans were built for compute capability {built_cc} ({section.get('device')}), but this "
            f"GPU{here} has compute capability {compute_capability}: rebuild them here with 'csc export --tensorrt'"
        )
    return section


# ----------------------------------------------------------------------------- building
def _network_flags(trt) -> int:
    """Strongly typed (see the module docstring); on TensorRT 11 every network is, and the flag may be gone."""
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    return 0 if flag is None else 1 << int(flag)


def _use_timing_cache(config, data: bytes) -> None:
    """Load a saved timing cache; one from another GPU or TensorRT is refused and the build starts afresh."""
    try:
        cache = config.create_timing_cache(data)
        if cache is not None and config.set_timing_cache(cache, ignore_mismatch=False):
            return
    except Exception as err:  # a damaged cache file must not stop a build; it is rewritten afterwards
        warnings.warn(f"TensorRT timing cache not usable, starting a new one: {err}", stacklevel=3)
    config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)


def build_plan(
    onnx_path: str | os.PathLike,
    shapes: dict[str, tuple[tuple[int, ...], ...]],
    timing_cache: bytes = b"",
    workspace_mib: int | None = None,
) -> tuple[bytes, bytes]:
    """Parse one ONNX graph and build a plan for the profile ``shapes``; returns (plan, updated timing cache)."""
    trt = import_tensorrt()
    onnx_path = Path(onnx_path)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(_network_flags(trt))
    parser = trt.OnnxParser(network, logger)  # owns the parsed weights: keep it alive until the build is done
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)] or ["(no error reported)"]
        raise TensorRTBuildError(f"{onnx_path.name}: the TensorRT ONNX parser refused it:\n  " + "\n  ".join(errors))
    config = builder.create_builder_config()
    if workspace_mib is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mib) << 20)
    if hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        name = network.get_input(i).name
        if name not in shapes:
            raise TensorRTBuildError(f"{onnx_path.name}: no profile shapes for input {name!r} (have {sorted(shapes)})")
        profile.set_shape(name, *shapes[name])
    config.add_optimization_profile(profile)
    _use_timing_cache(config, timing_cache)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise TensorRTBuildError(f"{onnx_path.name}: TensorRT could not build a plan for {shapes} (see its log above)")
    return bytes(plan), bytes(config.get_timing_cache().serialize())


def build_plans(
    artifact_dir: str | os.PathLike,
    profile: Profile = Profile(),
    precision: str = "float32",
    *,
    timing_cache: str | os.PathLike | None = None,
    workspace_mib: int | None = None,
    graphs: tuple[str, ...] = GRAPH_NAMES,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Build ``<graph>.plan`` (``<graph>_fp16.plan`` for float16) from each exported graph in ``artifact_dir``
    and record them in its manifest; returns the manifest's ``tensorrt`` section.

    ``timing_cache``: file to reuse and update (default ``trt_timing.cache`` in ``artifact_dir``).
    ``workspace_mib``: the builder's scratch memory limit (default: TensorRT's, the whole GPU).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
    directory = Path(artifact_dir)
    manifest = read_manifest(directory)
    stride = int(manifest["model"]["total_stride"])
    profile.check_stride(stride)
    trt = import_tensorrt()
    device = cuda_device()
    cache_path = Path(timing_cache) if timing_cache else directory / TIMING_CACHE_NAME
    cache = cache_path.read_bytes() if cache_path.is_file() else b""
    recorded = cache_path.name if cache_path.resolve().parent == directory.resolve() else str(cache_path.resolve())
    section = _section(manifest, trt.__version__, device, recorded)
    sources = [_source(directory, manifest, graph + PRECISIONS[precision]) for graph in graphs]  # before any build
    for name, entry, onnx_path in sources:
        if progress:
            progress(f"{name}.plan")
        plan, cache = build_plan(onnx_path, input_shapes(profile, entry["inputs"], stride), cache, workspace_mib)
        plan_path = directory / f"{name}.plan"
        atomic_write(plan_path, lambda tmp, data=plan: Path(tmp).write_bytes(data))
        # Saved after every plan, so a later failure keeps the kernels already timed and the plans already built.
        atomic_write(cache_path, lambda tmp, data=cache: Path(tmp).write_bytes(data))
        section["plans"][name] = {"file": plan_path.name, "sha256": sha256_file(plan_path), "precision": precision,
                                  "profile": profile.to_dict(), "onnx": entry["file"], "onnx_sha256": entry["sha256"]}
        manifest["tensorrt"] = section
        manifest.setdefault("versions", {})["tensorrt"] = trt.__version__
        write_manifest(directory, manifest)
    return section


def _section(manifest: dict, version: str, device: dict[str, str], timing_cache: str) -> dict:
    """The ``tensorrt`` section to fill. Plans of an earlier build (the other precision, say) stay listed only if
    they came from this TensorRT version for this GPU architecture."""
    earlier = manifest.get("tensorrt") if isinstance(manifest.get("tensorrt"), dict) else {}
    same = (earlier.get("version"), earlier.get("compute_capability")) == (version, device["compute_capability"])
    plans = dict(earlier.get("plans") or {}) if same else {}
    return {"version": version, **device, "timing_cache": timing_cache, "plans": plans}


def _source(directory: Path, manifest: dict, name: str) -> tuple[str, dict, Path]:
    """The ONNX graph a plan is built from, hash-checked and statically checked for the parser."""
    entry = manifest.get("onnx", {}).get("graphs", {}).get(name)
    if entry is None:
        hint = " --fp16" if name.endswith(PRECISIONS["float16"]) else ""
        raise ArtifactError(f"{directory}: no {name} ONNX graph to build from (export with 'csc export{hint}')")
    onnx_path = artifact_path(directory, entry)
    problems = check_tensorrt_compatible(onnx_path)
    if problems:
        raise TensorRTBuildError(f"{onnx_path.name}: TensorRT cannot parse it:\n  " + "\n  ".join(problems))
    return name, entry, onnx_path


# ----------------------------------------------------------------------------- command line
def _positive_mib(text: str) -> int:
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a positive whole number of MiB, got {text!r}")
    return int(text)


def add_tensorrt_arguments(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """The ``--tensorrt`` options of ``csc export``; ``build_from_args`` acts on them."""
    group = parser.add_argument_group(
        "TensorRT",
        f"Build TensorRT plans from the exported graphs on this machine's GPU ({INSTALL_HINT}). A plan runs only "
        "with the TensorRT version that built it, on GPUs of the same compute capability.",
    )
    group.add_argument("--tensorrt", action="store_true", help="build <graph>.plan (and <graph>_fp16.plan with --fp16)")
    group.add_argument("--trt-batch", default=DEFAULT_BATCH, metavar="MIN,OPT,MAX",
                       help="batch sizes the plans accept; kernels are tuned for OPT (one value: fixed)")
    group.add_argument("--trt-size", default=DEFAULT_SIZE, metavar="HxW,HxW,HxW",
                       help="image sizes min,opt,max the plans accept, multiples of the model's total stride")
    group.add_argument("--trt-timing-cache", default=None, metavar="PATH",
                       help=f"timing cache file to reuse and update; unset: {TIMING_CACHE_NAME} in --out")
    group.add_argument("--trt-workspace-mib", type=_positive_mib, default=None, metavar="MIB",
                       help="builder scratch memory limit in MiB; unset: TensorRT's own, the whole GPU")
    return group


def check_tensorrt_args(args: argparse.Namespace) -> None:
    """With ``--tensorrt``, fail before the ONNX export on a malformed profile, or without TensorRT or a GPU."""
    if getattr(args, "tensorrt", False):
        parse_profile(args.trt_batch, args.trt_size)
        import_tensorrt()
        cuda_device()


def build_from_args(artifact_dir: str | os.PathLike, args: argparse.Namespace) -> dict | None:
    """Build the plans ``args`` ask for (none without ``--tensorrt``); float16 too with ``--fp16``."""
    if not getattr(args, "tensorrt", False):
        return None
    stride = int(read_manifest(artifact_dir)["model"]["total_stride"])
    profile = parse_profile(args.trt_batch, args.trt_size, stride)
    precisions = ["float32"] + (["float16"] if getattr(args, "fp16", False) else [])
    section: dict = {}
    for precision in precisions:
        section = build_plans(artifact_dir, profile, precision, timing_cache=args.trt_timing_cache,
                              workspace_mib=args.trt_workspace_mib)
        for graph in GRAPH_NAMES:
            plan = section["plans"][graph + PRECISIONS[precision]]
            print(f"{Path(artifact_dir) / plan['file']}: TensorRT {section['version']}, {section['device']} "
                  f"(compute capability {section['compute_capability']}), {precision}, {profile.describe()}")
    return section
