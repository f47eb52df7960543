"""Convolution FLOPs of each call (encode, decode, reconstruct): counted from the model config, or read off
an exported graph.

``config_flops`` counts the convolutions the model runs, from ``CSCConfig`` alone, so it holds for every
model whatever ONNX shape inference makes of its graphs (it gives no concrete shapes inside a shift-averaged
``reconstruct``). Stage ``l`` (``C`` input channels, ``K`` atoms, ``k x k`` kernels, stride ``s``, ``n``
FISTA steps) on an ``H x W`` input has ``h x w = H/s x W/s`` code positions; one analysis convolution
``D^T x`` and one synthesis transposed convolution ``D z`` each cost ``2 C K k^2 h w`` (``2`` per
multiply-add, whatever the boundary: circular padding pads before the convolution and folds after it).

- ``encode``: per stage, ``eta D^T x`` once, then per step after the first one synthesis and one analysis
  (the gradient step ``eta D^T (x - D y)``): ``(2 n - 1)`` of them. In the folded and inference forms (what
  exported graphs, compiled and eager no-gradient torch run) a ``1 x 1`` stage of stride 1 applies its Gram
  step as one ``K x K`` matrix: ``2 K^2 h w`` per step after the first, in place of the pair.
- ``decode``: one synthesis per stage.
- ``reconstruct``: ``encode`` + ``decode``; with ``shift_average`` (and a total stride ``S > 1``) that of
  the shifted copies (``len(config.shifts)``: ``S^2``, fewer with ``shift_step`` or ``shift_pattern``), each
  padded to ``(H + S) x (W + S)``.

Images are padded up to a multiple of the total stride first, as the backends do.

``conv_flops`` reads the same count off an ONNX graph: shape inference runs on a copy whose dynamic input
axes are fixed; every ``Conv`` and ``ConvTranspose`` then has concrete shapes, and its multiply-adds count
twice: ``Conv`` does ``C_in/groups * kh * kw`` of them per output value, ``ConvTranspose`` the same per input
value (scattered to its outputs). It checks ``config_flops`` against real graphs (tests/test_bench.py) where
shape inference gives concrete shapes.
"""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import onnx

    from csc_serve.models import CSCConfig

CALLS = ("encode", "decode", "reconstruct")
FORMS = ("training", "folded", "inference")  # csc_serve.models.fista.FISTA_FORMS


def _align(n: int, stride: int) -> int:
    return stride * -(-n // stride)


def _per_image(config: CSCConfig, height: int, width: int, form: str) -> tuple[int, int]:
    """Convolution FLOPs of encoding one stride-aligned ``height x width`` image, and of decoding its codes."""
    encode = decode = 0
    h, w = height, width
    for i, stage in enumerate(config.stages):
        c, k = config.stage_in_channels(i), stage.num_atoms
        h, w = h // stage.stride, w // stage.stride  # this stage's code positions
        one = 2 * c * k * stage.kernel_size**2 * h * w  # one analysis conv, or one synthesis conv-transpose
        if form != "training" and stage.kernel_size == 1 and stage.stride == 1:
            gram = 2 * k * k * h * w  # (1 - eta mu) I - eta D^T D as one 1x1 convolution
        else:
            gram = 2 * one  # eta D^T (x - D y)
        encode += one + (stage.num_steps - 1) * gram
        decode += one
    return encode, decode


def config_flops(config: CSCConfig, call: str, batch: int, height: int, width: int, form: str = "inference") -> int:
    """Convolution FLOPs (2 per multiply-add) of ``call`` on ``batch`` images of ``height x width`` (for
    ``decode``: the codes of such images), counted from the config. ``form`` is the FISTA form that runs
    (``csc_serve.models.fista_form``): exported graphs and no-gradient torch run ``"inference"``."""
    if call not in CALLS:
        raise ValueError(f"unknown call {call!r}; choose from {', '.join(CALLS)}")
    if form not in FORMS:
        raise ValueError(f"unknown form {form!r}; choose from {', '.join(FORMS)}")
    if min(batch, height, width) < 1:
        raise ValueError(f"batch, height and width must be positive, got {batch}, {height}, {width}")
    s = config.total_stride
    h, w = _align(height, s), _align(width, s)
    copies = 1
    if call == "reconstruct" and config.shift_average and s > 1:
        # every shift (dy, dx) pads dy + (s - dy) rows, dx + (s - dx) columns
        copies, h, w = len(config.shifts), h + s, w + s
    encode, decode = _per_image(config, h, w, form)
    per_image = {"encode": encode, "decode": decode, "reconstruct": encode + decode}[call]
    return batch * copies * per_image


def _fix_inputs(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]]) -> onnx.ModelProto:
    import onnx

    model = onnx.ModelProto.FromString(model.SerializeToString())
    for value in model.graph.input:
        if value.name not in shapes:
            continue
        dims = value.type.tensor_type.shape.dim
        shape = shapes[value.name]
        if len(dims) != len(shape):
            raise ValueError(f"input {value.name} has rank {len(dims)}, got shape {shape}")
        for dim, size in zip(dims, shape):
            dim.ClearField("dim_param")
            dim.dim_value = int(size)
    return model


def _shape(shapes: dict[str, list[int]], name: str, node: onnx.NodeProto) -> list[int]:
    shape = shapes.get(name)
    if shape is None or any(d <= 0 for d in shape):
        raise ValueError(f"no concrete shape for {name} (input of {node.op_type} {node.name!r})")
    return shape


def conv_flops(model: onnx.ModelProto | str | os.PathLike, input_shapes: dict[str, tuple[int, ...]]) -> int:
    """Floating-point operations (2 per multiply-add) of every convolution in the graph, for the given
    input shapes (batch first; names the graph does not have are ignored). Raises ``ValueError`` where
    shape inference leaves a convolution without concrete shapes (``config_flops`` does not need them)."""
    import onnx

    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model))
    batches = {shape[0] for shape in input_shapes.values()}
    if len(batches) != 1:
        raise ValueError(f"every input needs the same batch size, got {input_shapes}")
    batch = batches.pop()
    if batch == 1:
        # Shape inference cannot tell a batch of 1 from a broadcast dimension (the per-sample thresholds):
        # count a batch of 2, then halve (every convolution is applied sample by sample).
        doubled = {name: (2, *shape[1:]) for name, shape in input_shapes.items()}
        return conv_flops(model, doubled) // 2
    inferred = onnx.shape_inference.infer_shapes(_fix_inputs(model, input_shapes), data_prop=True)
    shapes: dict[str, list[int]] = {}
    for value in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
        dims = value.type.tensor_type.shape.dim
        shapes[value.name] = [d.dim_value if d.HasField("dim_value") else -1 for d in dims]
    for init in inferred.graph.initializer:
        shapes[init.name] = list(init.dims)
    total = 0
    for node in inferred.graph.node:
        if node.op_type not in ("Conv", "ConvTranspose"):
            continue
        # Conv weight (C_out, C_in/g, kh, kw): one weight[1]*kh*kw dot product per output value.
        # ConvTranspose weight (C_in, C_out/g, kh, kw): each input value meets weight[1]*kh*kw weights.
        weight = _shape(shapes, node.input[1], node)
        counted = node.output[0] if node.op_type == "Conv" else node.input[0]
        total += 2 * math.prod(weight[1:]) * math.prod(_shape(shapes, counted, node))
    return total
