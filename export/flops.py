"""Convolution FLOPs of an exported graph at a concrete input shape, read off the graph itself.

Shape inference runs on a copy whose dynamic input axes are fixed; every ``Conv`` and ``ConvTranspose``
then has concrete shapes, and its multiply-adds count twice: ``Conv`` does ``C_in/groups * kh * kw`` of them
per output value, ``ConvTranspose`` the same per input value (scattered to its outputs).
"""

from __future__ import annotations

import math
import os

import onnx


def _fix_inputs(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]]) -> onnx.ModelProto:
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
    input shapes (batch first; names the graph does not have are ignored)."""
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
