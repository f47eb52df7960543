"""The TensorRT ONNX parser check (``csc_serve.export.trt_ops``) on hand-made graphs: what it accepts and what it
reports, one graph per rule."""

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper  # noqa: E402

from csc_serve.export.trt_ops import check_tensorrt_compatible, unsupported_ops  # noqa: E402


# ----------------------------------------------------------------------------- hand-made graphs
def make_model(nodes, inputs, outputs, initializers=(), opset=17, domains=()):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)] + [
        helper.make_opsetid(d, 1) for d in domains])


def value(name, shape, dtype=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, dtype, shape)


def one_op(op, dtype=TensorProto.FLOAT, outputs=("y",), domain="", **attrs):
    node = helper.make_node(op, ["x"], list(outputs), domain=domain, **attrs)
    return make_model([node], [value("x", [1, 1, 4, 4], dtype)], [value(o, None) for o in outputs],
                      domains=[domain] if domain else [])


def conv(op="Conv", weight_shape=(4, 2, 3, 3), channels=2, bias=None, **attrs):
    weights = [helper.make_tensor("w", TensorProto.FLOAT, weight_shape, np.ones(weight_shape).ravel().tolist())]
    nodes, inputs = [], [value("x", [1, channels, 8, 8])]
    if bias == "initializer":
        weights.append(helper.make_tensor("b", TensorProto.FLOAT, [weight_shape[0]], [0.0] * weight_shape[0]))
    elif bias == "computed":
        nodes.append(helper.make_node("Relu", ["bias_in"], ["b"]))
        inputs.append(value("bias_in", [weight_shape[0]]))
    nodes.append(helper.make_node(op, ["x", "w"] + (["b"] if bias else []), ["y"], **attrs))
    return make_model(nodes, inputs, [value("y", None)], weights)


def pad(mode, opset=17):
    pads = helper.make_tensor("pads", TensorProto.INT64, [8], [0, 0, 1, 1, 0, 0, 1, 1])
    node = helper.make_node("Pad", ["x", "pads"], ["y"], mode=mode)
    return make_model([node], [value("x", [1, 1, 4, 4])], [value("y", None)], [pads], opset=opset)


def in_if_branch():
    then = helper.make_graph([helper.make_node("Unique", ["x"], ["u"])], "then", [], [value("u", None)])
    other = helper.make_graph([helper.make_node("Identity", ["x"], ["v"])], "else", [], [value("v", None)])
    node = helper.make_node("If", ["c"], ["y"], then_branch=then, else_branch=other)
    return make_model([node], [value("c", [], TensorProto.BOOL), value("x", [4])], [value("y", None)])


# name -> (graph, the problem the check must report, or None when TensorRT parses it)
HAND_MADE = {
    "pad-constant": (lambda: pad("constant"), None),
    "pad-reflect": (lambda: pad("reflect"), None),
    "pad-edge": (lambda: pad("edge"), None),
    "pad-wrap-17": (lambda: pad("wrap"), "Pad 'y': mode 'wrap' needs opset 19 or newer (the graph is opset 17)"),
    "pad-wrap-19": (lambda: pad("wrap", opset=19), None),
    "pad-symmetric": (lambda: pad("symmetric"), "mode 'symmetric' is not one TensorRT pads with"),
    "opset-8": (lambda: pad("edge", opset=8), "opset 8 is outside the range TensorRT 10 parses (9 to 20)"),
    "opset-21": (lambda: pad("edge", opset=21), "opset 21 is outside the range TensorRT 10 parses (9 to 20)"),
    "unique": (lambda: one_op("Unique"), "operator Unique is not supported by the TensorRT ONNX parser"),
    "other-domain": (lambda: one_op("FusedConv", domain="com.microsoft"), "com.microsoft::FusedConv is not supported"),
    "in-if-branch": (in_if_branch, "operator Unique is not supported"),
    # As exported: stride 2, padding (k - 1) / 2 and output_padding s - 1, resolved by the parser.
    "deconv-as-exported": (
        lambda: conv("ConvTranspose", (2, 3, 3, 3), strides=[2, 2], pads=[1, 1, 1, 1], output_padding=[1, 1]), None),
    "deconv-same-output-padding": (
        lambda: conv("ConvTranspose", (2, 3, 3, 3), strides=[2, 2], auto_pad="SAME_UPPER", output_padding=[1, 1]),
        "output_padding [1, 1] with auto_pad SAME_*: TensorRT would ignore it"),
    "conv-groups": (lambda: conv(weight_shape=(6, 2, 3, 3), channels=6, group=3), None),
    "conv-bad-groups": (lambda: conv(weight_shape=(6, 2, 3, 3), channels=6, group=2), "group 2 x 2 kernel channels"),
    "conv-same-and-pads": (lambda: conv(auto_pad="SAME_UPPER", pads=[1, 1, 1, 1]), "auto_pad SAME_UPPER together"),
    "conv-constant-bias": (lambda: conv(bias="initializer"), None),
    "conv-computed-bias": (lambda: conv(bias="computed"), "the parser needs the bias as an initializer"),
    "int64-input": (lambda: one_op("Cast", TensorProto.INT64, to=TensorProto.FLOAT), None),  # native in TensorRT 10
    "float64-input": (lambda: one_op("Cast", TensorProto.DOUBLE, to=TensorProto.FLOAT), "network input 'x' is float64"),
    "int-sqrt": (lambda: one_op("Sqrt", TensorProto.INT32), "int32 input: TensorRT runs Sqrt on float32/float16/"),
    "maxpool-indices": (lambda: one_op("MaxPool", outputs=("y", "i"), kernel_shape=[2, 2]), "Indices output"),
    "maxpool-dilated": (lambda: one_op("MaxPool", kernel_shape=[2, 2], dilations=[2, 2]), "pools without dilation"),
    "topk-unsorted": (lambda: one_op("TopK", sorted=0), "TopK 'y': sorted=0 is not supported (only 1)"),
    "resize-crop": (lambda: one_op("Resize", mode="linear", coordinate_transformation_mode="tf_crop_and_resize"),
                    "coordinate_transformation_mode 'tf_crop_and_resize' is not supported"),
}


@pytest.mark.parametrize("model,problem", list(HAND_MADE.values()), ids=list(HAND_MADE))
def test_hand_made_graphs(model, problem):
    problems = check_tensorrt_compatible(model())
    if problem is None:
        assert problems == []
    else:
        assert any(problem in p for p in problems), problems


def test_opset_argument_checks_the_graph_as_another_opset():
    assert check_tensorrt_compatible(pad("wrap", opset=17), opset=19) == []


def test_unsupported_ops_are_listed_once_with_their_domain():
    assert unsupported_ops(in_if_branch()) == ["Unique"]
    assert unsupported_ops(one_op("FusedConv", domain="com.microsoft")) == ["com.microsoft::FusedConv"]
