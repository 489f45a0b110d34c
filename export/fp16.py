"""fp16 variants of the fp32 ONNX graphs: matrix products in fp16, everything else in fp32.

An ONNX graph transform: the float inputs of every ``MatMul``/``Gemm``/``Conv``
become fp16 (weights converted once, activations through a ``Cast``), and their
output is cast back to fp32 under its original name. Softmax, the l2norm
(sum of squares, sqrt, ``+1e-8``, div), reductions, the GRU and the embedding
stay fp32 -- ``1e-8`` is 0 in fp16, and the masked fills (-1e4) and
exponentials need fp32 range. Graph inputs and outputs stay float32, so an fp16
graph has the same I/O contract as its fp32 graph.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .errors import ExportError

__all__ = ["FP16_OPS", "convert_to_fp16", "with_explicit_rounding"]

log = logging.getLogger(__name__)

FP16_OPS = ("MatMul", "Gemm", "Conv")
FP16_MAX = float(np.finfo(np.float16).max)


def _float_tensors(model: onnx.ModelProto) -> set[str]:
    """Names of the float32 tensors of the top-level graph (from shape inference)."""
    inferred = onnx.shape_inference.infer_shapes(model)
    g = inferred.graph
    names = {
        v.name
        for v in (*g.input, *g.output, *g.value_info)
        if v.type.tensor_type.elem_type == TensorProto.FLOAT
    }
    names |= {i.name for i in g.initializer if i.data_type == TensorProto.FLOAT}
    return names


def convert_to_fp16(model: onnx.ModelProto, ops: tuple[str, ...] = FP16_OPS) -> onnx.ModelProto:
    """A copy of ``model`` whose ``ops`` compute in fp16, everything else unchanged (fp32).

    Raises:
        ExportError: a weight does not fit in fp16 (|w| > 65504), or the graph
            has subgraphs inside converted nodes.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    floats = _float_tensors(model)
    inits = {i.name: i for i in g.initializer}
    half_of: dict[str, str] = {}  # fp32 tensor -> its fp16 twin
    new_inits: list[onnx.TensorProto] = []
    nodes: list[onnx.NodeProto] = []
    converted = 0

    def half(name: str) -> str:
        if name in half_of:
            return half_of[name]
        twin = f"{name}__fp16"
        if name in inits:
            w = numpy_helper.to_array(inits[name])
            if np.abs(w).max(initial=0.0) > FP16_MAX:
                raise ExportError(
                    f"weight {name} has values beyond the fp16 range (|w| > {FP16_MAX:g}); export fp32 only"
                )
            new_inits.append(numpy_helper.from_array(w.astype(np.float16), twin))
        else:
            nodes.append(
                helper.make_node("Cast", [name], [twin], name=f"{twin}__cast", to=TensorProto.FLOAT16)
            )
        half_of[name] = twin
        return twin

    for node in g.node:
        if node.op_type not in ops or not all(o in floats for o in node.output):
            nodes.append(node)
            continue
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            raise ExportError(
                f"node {node.name} ({node.op_type}) has subgraphs; the fp16 transform does not handle them"
            )
        new = onnx.NodeProto()
        new.CopyFrom(node)
        for i, name in enumerate(node.input):
            if name and name in floats:
                new.input[i] = half(name)
        for i, name in enumerate(node.output):
            new.output[i] = f"{name}__fp16"
        nodes.append(new)
        for name in node.output:
            nodes.append(
                helper.make_node(
                    "Cast", [f"{name}__fp16"], [name], name=f"{name}__cast_fp32", to=TensorProto.FLOAT
                )
            )
        converted += 1

    # fp32 weights no longer read by any node are dropped.
    still_used = {name for node in nodes for name in node.input}
    kept = [i for i in g.initializer if i.name in still_used]
    del g.initializer[:]
    g.initializer.extend(kept + new_inits)
    del g.node[:]
    g.node.extend(nodes)
    log.info(
        "fp16: %d node(s) of %s converted, %d weight(s) in fp16", converted, "/".join(ops), len(new_inits)
    )
    return out


def with_explicit_rounding(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of an fp16 graph on which ONNX Runtime's CPU provider rounds like an fp16 device.

    The CPU provider has no fp16 ``MatMul`` on most x86 CPUs: it computes in fp32
    and removes each ``Cast`` fp32->fp16->fp32 pair, so fp16 rounding of activations
    would go unmeasured. An ``Identity`` on every fp16 tensor made by the transform
    keeps the casts (load the copy with graph optimisations disabled); the result is
    fp16-rounded inputs and outputs with fp32 accumulation. For validation only.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    weights = {t.name for t in g.initializer}
    nodes: list[onnx.NodeProto] = []
    for node in g.node:
        new = onnx.NodeProto()
        new.CopyFrom(node)
        for i, name in enumerate(new.input):
            if name.endswith("__fp16") and name not in weights:
                new.input[i] = f"{name}__kept"
        nodes.append(new)
        for name in node.output:
            if name.endswith("__fp16"):
                nodes.append(helper.make_node("Identity", [name], [f"{name}__kept"], name=f"{name}__keep"))
    del g.node[:]
    g.node.extend(nodes)
    return out
