"""Will TensorRT's ONNX parser take this graph? A static check that needs neither TensorRT nor a GPU.

The parser (onnx-tensorrt, built into TensorRT 10 and 11) imports a graph node by node through one importer
per ONNX operator; a node without an importer, or one whose attributes its importer refuses, fails the
whole build, usually minutes into ``csc export --tensorrt`` on a GPU machine and with a terse message. This
module reads the same facts from the ``.onnx`` file up front:

- the default-domain opset: every TensorRT 10 release parses opsets 9 to 20 (later ones parse newer opsets,
  but the graphs may be built into plans on another machine, with an older TensorRT 10);
- operators: the parser's operator table, walked through ``If``/``Loop``/``Scan`` bodies and model-local
  functions (which the parser inlines); ops from other domains need a TensorRT plugin;
- data types: network inputs and outputs must be types TensorRT has (no float64, no unsigned types wider
  than 8 bits); convolution, pooling and transcendental ops take floating point only;
- the attribute restrictions of the importers our graphs go through (``Pad`` modes, ``Conv`` and
  ``ConvTranspose`` padding, groups and rank, pooling, ``Resize``) and a few that commonly bite elsewhere.

The exported CSC graphs use Conv, ConvTranspose, elementwise arithmetic, Relu/Min/Max, Shape/Gather/Slice/
Concat, Where/Expand/Equal and, for edge replication, ``Pad`` in ``edge`` mode; the circular boundary is
traced as Slice and Concat, not as a ``Pad``, so it needs no ``wrap`` mode (which ONNX has from opset 19).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable, Iterator

MIN_OPSET = 9
MAX_OPSET = 20

SUPPORTED_OPS = frozenset(
    """
    Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh Attention AveragePool BatchNormalization
    BlackmanWindow Cast CastLike Ceil Celu Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh
    CumSum DeformConv DepthToSpace DequantizeLinear Div Dropout Einsum Elu Equal Erf Exp Expand EyeLike Flatten
    Floor Gather GatherElements GatherND Gelu Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool Greater
    GreaterOrEqual GridSample GroupNormalization GRU HammingWindow HannWindow HardSigmoid HardSwish Hardmax
    Identity If ImageScaler InstanceNormalization IsInf IsNaN LayerNormalization LeakyRelu Less LessOrEqual Log
    LogSoftmax Loop LRN LSTM LpNormalization LpPool MatMul Max MaxPool Mean MeanVarianceNormalization Min Mish
    Mod Mul Neg NonMaxSuppression NonZero Not OneHot Or Pad ParametricSoftplus Pow PRelu QuantizeLinear
    RandomNormal RandomNormalLike RandomUniform RandomUniformLike Range Reciprocal ReduceL1 ReduceL2
    ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu
    Reshape Resize ReverseSequence RMSNormalization RNN RoiAlign RotaryEmbedding Round STFT ScaledTanh Scan
    Scatter ScatterElements ScatterND Selu Shape Shrink Sigmoid Sign Sin Sinh Size Slice Softmax Softplus
    Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh TensorScatter ThresholdedRelu Tile TopK Transpose
    Trilu Unsqueeze Upsample Where Xor
    """.split()
)

# Ops whose importers take floating point tensors only (FP32, FP16, BF16), and the boolean ones.
FLOAT_ONLY_OPS = frozenset(
    """
    Acos Acosh Asin Asinh Atan Atanh AveragePool BatchNormalization Ceil Celu Clip Conv ConvTranspose Cos Cosh
    CumSum Dropout Einsum Elu Erf Exp Floor Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool GroupNormalization
    GRU HardSigmoid HardSwish Hardmax InstanceNormalization IsInf LayerNormalization LeakyRelu Log LogSoftmax LRN
    LSTM LpNormalization LpPool MatMul MaxPool MeanVarianceNormalization PRelu Reciprocal Resize RNN Round
    ScaledTanh Selu Sigmoid Sin Sinh Softmax Softplus Softsign Sqrt Tan Tanh ThresholdedRelu Upsample
    """.split()
)
BOOL_ONLY_OPS = frozenset({"And", "Or", "Xor", "Not"})

# ONNX TensorProto element types (numbers, so the table needs no onnx import).
FLOAT, UINT8, INT8, UINT16, INT16, INT32, INT64, STRING, BOOL, FLOAT16, DOUBLE, UINT32, UINT64 = (
    1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13)
COMPLEX64, COMPLEX128, BFLOAT16 = 14, 15, 16
FLOATING = frozenset({FLOAT, FLOAT16, BFLOAT16})
NETWORK_IO_TYPES = frozenset({FLOAT, FLOAT16, BFLOAT16, INT32, INT64, UINT8, BOOL})
NO_TENSORRT_TYPE = frozenset({STRING, UINT16, INT16, UINT32, UINT64, COMPLEX64, COMPLEX128})

PAD_MODES = {"constant": 2, "reflect": 2, "edge": 2, "wrap": 19}  # mode -> first opset that has it
RESIZE_COORDINATES = {"half_pixel", "pytorch_half_pixel", "tf_half_pixel_for_nn", "asymmetric", "align_corners"}
RESIZE_MODES = {"nearest", "linear", "cubic"}
RESIZE_ROUNDING = {"floor", "ceil", "round_prefer_floor", "round_prefer_ceil"}


@dataclass
class _Context:
    """What the per-op checks may look at: the opset, constant tensors, inferred element types and shapes."""

    opset: int
    weights: dict = field(default_factory=dict)  # name -> TensorProto (initializers and Constant outputs)
    types: dict = field(default_factory=dict)  # name -> element type
    shapes: dict = field(default_factory=dict)  # name -> list of int | None


def _load(model_or_path):
    import onnx

    if isinstance(model_or_path, onnx.ModelProto):
        return model_or_path
    if isinstance(model_or_path, (str, os.PathLike)):
        return onnx.load(os.fspath(model_or_path), load_external_data=False)
    raise TypeError(f"expected an onnx.ModelProto or a path, got {type(model_or_path).__name__}")


def model_opset(model) -> int | None:
    """The opset of the default (``ai.onnx``) domain the model imports, or None if it imports none."""
    return next((entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx")), None)


def _subgraphs(node) -> Iterator[tuple[str, object]]:
    """The bodies a node holds (``If`` branches, ``Loop`` and ``Scan`` bodies), with their attribute names."""
    from onnx import AttributeProto

    for attribute in node.attribute:
        if attribute.type == AttributeProto.GRAPH:
            yield attribute.name, attribute.g
        elif attribute.type == AttributeProto.GRAPHS:
            yield from ((attribute.name, body) for body in attribute.graphs)


def _walk(graph, functions: dict, where: str = "") -> Iterator[tuple[object, str]]:
    """Every node with a description of where it sits: subgraph bodies and local function bodies included."""
    for node in graph.node:
        yield node, where
        label = f"{where}in {node.op_type} '{node.name or node.output[0]}': "
        for name, body in _subgraphs(node):
            yield from _walk(body, functions, f"{label}{name}: ")
        function = functions.get((node.domain, node.op_type))
        if function is not None:
            yield from _walk(function, functions, f"{label}function body: ")


def _graphs(graph) -> Iterator[object]:
    yield graph
    for node in graph.node:
        for _, body in _subgraphs(node):
            yield from _graphs(body)


def _is_default_domain(domain: str) -> bool:
    return domain in ("", "ai.onnx")


def unsupported_ops(model_or_path) -> list[str]:
    """Operators the parser has no importer for, sorted; ops of other domains as ``domain::Op``."""
    model = _load(model_or_path)
    functions = {(f.domain, f.name): f for f in model.functions}
    found = set()
    for node, _ in _walk(model.graph, functions):
        if (node.domain, node.op_type) in functions:
            continue  # inlined by the parser: its body was walked
        if not _is_default_domain(node.domain):
            found.add(f"{node.domain}::{node.op_type}")
        elif node.op_type not in SUPPORTED_OPS:
            found.add(node.op_type)
    return sorted(found)


def _context(model, opset: int) -> _Context:
    """Constant tensors, and element types and shapes from ONNX shape inference (best effort)."""
    import onnx
    from onnx import shape_inference

    try:
        inferred = shape_inference.infer_shapes(model)
    except Exception:  # a graph inference cannot follow is still worth checking op by op
        inferred = model
    ctx = _Context(opset)
    for graph in _graphs(inferred.graph):
        for init in graph.initializer:
            ctx.weights[init.name] = init
        for node in graph.node:
            if node.op_type == "Constant" and node.attribute and node.attribute[0].type == onnx.AttributeProto.TENSOR:
                ctx.weights[node.output[0]] = node.attribute[0].t
        for info in (*graph.input, *graph.value_info, *graph.output):
            tensor = info.type.tensor_type
            if tensor.elem_type:
                ctx.types[info.name] = tensor.elem_type
            if tensor.HasField("shape"):
                ctx.shapes[info.name] = [d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim]
    for name, tensor in ctx.weights.items():
        ctx.types.setdefault(name, tensor.data_type)
        ctx.shapes.setdefault(name, list(tensor.dims))
    return ctx


def _attrs(node) -> dict:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _type_name(dtype: int) -> str:
    from onnx import TensorProto

    names = {FLOAT: "float32", FLOAT16: "float16", BFLOAT16: "bfloat16", DOUBLE: "float64"}
    return names.get(dtype) or TensorProto.DataType.Name(dtype).lower()


# ----------------------------------------------------------------------------- per-op restrictions
def _check_pad(node, attrs: dict, ctx: _Context) -> list[str]:
    mode = _text(attrs.get("mode", "constant"))
    if mode not in PAD_MODES:
        return [f"mode '{mode}' is not one TensorRT pads with (constant, reflect, edge, wrap)"]
    if ctx.opset < PAD_MODES[mode]:
        return [f"mode '{mode}' needs opset {PAD_MODES[mode]} or newer (the graph is opset {ctx.opset})"]
    return []


def _check_padding_attrs(attrs: dict) -> list[str]:
    auto_pad = _text(attrs.get("auto_pad", "NOTSET"))
    if auto_pad not in ("NOTSET", "VALID", "SAME_UPPER", "SAME_LOWER"):
        return [f"auto_pad '{auto_pad}' is not NOTSET, VALID, SAME_UPPER or SAME_LOWER"]
    if auto_pad.startswith("SAME") and "pads" in attrs:
        return [f"auto_pad {auto_pad} together with pads is refused by the parser"]
    return []


def _check_conv(node, attrs: dict, ctx: _Context) -> list[str]:
    problems = _check_padding_attrs(attrs)
    weight_shape = ctx.shapes.get(node.input[1]) if len(node.input) > 1 else None
    if weight_shape is not None and not 3 <= len(weight_shape) <= 5:
        problems.append(f"{len(weight_shape) - 2}D convolution: TensorRT convolves in 1D, 2D or 3D only")
    group = attrs.get("group", 1)
    input_shape = ctx.shapes.get(node.input[0]) or []
    channels = input_shape[1] if len(input_shape) > 1 else None
    if group < 1:
        problems.append(f"group {group} must be positive")
    elif weight_shape and channels and weight_shape[1] * group != channels:
        problems.append(f"group {group} x {weight_shape[1]} kernel channels != {channels} input channels")
    has_bias = len(node.input) > 2 and node.input[2]
    if has_bias and node.input[1] in ctx.weights and node.input[2] not in ctx.weights:
        problems.append("constant weights with a computed bias: the parser needs the bias as an initializer")
    return problems


def _check_conv_transpose(node, attrs: dict, ctx: _Context) -> list[str]:
    problems = _check_padding_attrs(attrs)
    rank = len(ctx.shapes.get(node.input[0]) or [])
    if rank and not 3 <= rank <= 5:
        problems.append(f"rank-{rank} input: TensorRT deconvolves 1D, 2D or 3D inputs only")
    output_padding = list(attrs.get("output_padding", []))
    if _text(attrs.get("auto_pad", "NOTSET")).startswith("SAME") and any(output_padding):
        problems.append(f"output_padding {output_padding} with auto_pad SAME_*: TensorRT would ignore it")
    return problems


def _check_pool(node, attrs: dict, ctx: _Context) -> list[str]:
    problems = _check_padding_attrs(attrs)
    kernel = list(attrs.get("kernel_shape", []))
    if kernel and len(kernel) not in (2, 3):
        problems.append(f"{len(kernel)}D pooling: TensorRT pools in 2D or 3D only")
    if any(d != 1 for d in attrs.get("dilations", [])):
        problems.append(f"dilations {list(attrs['dilations'])}: TensorRT pools without dilation")
    if node.op_type == "MaxPool" and len(node.output) > 1 and node.output[1]:
        problems.append("the Indices output is not supported")
    return problems


def _check_resize(node, attrs: dict, ctx: _Context) -> list[str]:
    problems = []
    coordinates = _text(attrs.get("coordinate_transformation_mode", "half_pixel"))
    if ctx.opset >= 11 and coordinates not in RESIZE_COORDINATES:
        problems.append(f"coordinate_transformation_mode '{coordinates}' is not supported")
    if _text(attrs.get("mode", "nearest")) not in RESIZE_MODES:
        problems.append(f"mode '{_text(attrs['mode'])}' is not nearest, linear or cubic")
    if _text(attrs.get("nearest_mode", "round_prefer_floor")) not in RESIZE_ROUNDING:
        problems.append(f"nearest_mode '{_text(attrs['nearest_mode'])}' is not supported")
    if attrs.get("antialias", 0):
        problems.append("antialias is not supported")
    if _text(attrs.get("keep_aspect_ratio_policy", "stretch")) != "stretch":
        problems.append("keep_aspect_ratio_policy other than 'stretch' is not supported")
    return problems


def _check_cast(node, attrs: dict, ctx: _Context) -> list[str]:
    to = attrs.get("to", FLOAT)
    return [f"casts to {_type_name(to)}, which TensorRT has no type for"] if to in NO_TENSORRT_TYPE else []


def _check_constant(node, attrs: dict, ctx: _Context) -> list[str]:
    unsupported = sorted(set(attrs) & {"sparse_value", "value_string", "value_strings"})
    return [f"attribute {name} is not supported" for name in unsupported]


def _check_single_output(node, attrs: dict, ctx: _Context) -> list[str]:
    used = [name for name in node.output[1:] if name]
    return [f"only the first output is supported, but {used} are used"] if used else []


OP_CHECKS: dict[str, Callable] = {
    "Pad": _check_pad,
    "Conv": _check_conv,
    "ConvTranspose": _check_conv_transpose,
    "MaxPool": _check_pool,
    "AveragePool": _check_pool,
    "LpPool": _check_pool,
    "Resize": _check_resize,
    "Cast": _check_cast,
    "Constant": _check_constant,
    "LayerNormalization": _check_single_output,
}
# op -> [(attribute, the one value its importer takes)]; the defaults are those values.
REQUIRED_ATTRIBUTES = {
    "TopK": [("sorted", 1)],
    "ScatterND": [("reduction", "none")],
    "LSTM": [("layout", 0), ("input_forget", 0)],
}


def _required_attribute_problems(node, attrs: dict) -> list[str]:
    return [
        f"{name}={_text(attrs[name])} is not supported (only {expected})"
        for name, expected in REQUIRED_ATTRIBUTES.get(node.op_type, [])
        if name in attrs and _text(attrs[name]) != _text(expected)
    ]


def _type_problems(node, ctx: _Context) -> list[str]:
    dtype = ctx.types.get(node.input[0]) if node.input and node.input[0] else None
    if dtype is None:
        return []
    if node.op_type in FLOAT_ONLY_OPS and dtype not in FLOATING:
        return [f"{_type_name(dtype)} input: TensorRT runs {node.op_type} on float32/float16/bfloat16 only"]
    if node.op_type in BOOL_ONLY_OPS and dtype != BOOL:
        return [f"{_type_name(dtype)} input: {node.op_type} takes booleans only"]
    return []


def _io_problems(model) -> list[str]:
    problems = []
    initializers = {init.name for init in model.graph.initializer}
    for kind, values in (("input", model.graph.input), ("output", model.graph.output)):
        for value in values:
            dtype = value.type.tensor_type.elem_type
            if value.name in initializers or not value.type.HasField("tensor_type"):
                continue
            if dtype not in NETWORK_IO_TYPES:
                problems.append(
                    f"network {kind} '{value.name}' is {_type_name(dtype)}: TensorRT network inputs and outputs "
                    "are float32, float16, bfloat16, int32, int64, uint8 or bool"
                )
    return problems


def check_tensorrt_compatible(model_or_path, opset: int | None = None, *, max_opset: int = MAX_OPSET) -> list[str]:
    """Everything in the model the TensorRT 10 ONNX parser would refuse, one line each; empty when it parses.

    ``model_or_path``: an ``onnx.ModelProto`` or a path to an ``.onnx`` file (external data is not read).
    ``opset`` overrides the default-domain opset the model declares (to ask "would it parse at opset N?").
    """
    model = _load(model_or_path)
    declared = model_opset(model)
    opset = declared if opset is None else opset
    if opset is None:
        return ["the model imports no ai.onnx opset"]
    problems = []
    if not MIN_OPSET <= opset <= max_opset:
        problems.append(f"opset {opset} is outside the range TensorRT 10 parses ({MIN_OPSET} to {max_opset})")
    problems += _io_problems(model)
    problems += [f"operator {op} is not supported by the TensorRT ONNX parser" for op in unsupported_ops(model)]
    ctx = _context(model, opset)
    functions = {(f.domain, f.name): f for f in model.functions}
    for name, dtype in sorted(ctx.types.items()):
        if dtype in NO_TENSORRT_TYPE:
            problems.append(f"tensor '{name}' is {_type_name(dtype)}, which TensorRT has no type for")
    for node, where in _walk(model.graph, functions):
        if not _is_default_domain(node.domain):
            continue
        label = f"{where}{node.op_type} '{node.name or node.output[0]}'"
        check = OP_CHECKS.get(node.op_type)
        attrs = _attrs(node)
        found = (check(node, attrs, ctx) if check else []) + _required_attribute_problems(node, attrs)
        found += _type_problems(node, ctx)
        problems += [f"{label}: {message}" for message in found]
    return problems
