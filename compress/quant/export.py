"""The fake-quant student as an int8 QDQ ONNX graph that ONNX Runtime runs on integer kernels.

`export_qat_onnx` exports the model in `export_mode` (compress.quant.fake: activations through quantize /
dequantize, weights as int8 tensors dequantized per channel) with the one exporter (compress.onnx.export), then
`place_qdq` rewrites what the dynamo graph leaves in the way of ORT's QDQ fusion:

* `DequantizeLinear(W int8 [out, in], axis 0) -> Transpose -> MatMul`: the int8 initializer is stored transposed
  (`[in, out]`, axis 1) and the DequantizeLinear feeds the MatMul directly (ORT fuses DQ -> MatMul, not
  DQ -> Transpose -> MatMul);
* one activation Q/DQ pair per consumer: the exporter merges identical quantize / dequantize of one tensor (the
  LayerNorm output read by the Q, K and V projections) into one pair feeding three MatMuls; a QuantizeLinear /
  DequantizeLinear with several consumers is not the canonical QDQ form (the project's notes record graphs that
  stayed float for it; not reproduced on this graph with ORT 1.31).
  Each MatMul gets its own pair (same scale). ORT 1.31 copes with both forms by itself and merges the
  identical QuantizeLinear again after fusion (docs/quantization.md), so the rewrite costs nothing there.

Placement chosen: Q/DQ only on the inputs of the Linear layers (and the int8 weights), nothing around
LayerNorm, GELU or Softmax (ORT has no QDQ kernels for them: a Q/DQ there would only add work), and no Q after
a MatMul (the output stays float: DQ -> MatMul becomes MatMulIntegerToFloat). A Gemm's float bias becomes a
separate Add (`_split_gemm_bias`). The qat pass then runs ORT's transformer optimizer on the result
(compress.onnx.export.optimize_onnx), which folds the bias Adds into SkipLayerNormalization and BiasGelu:
on the 3-layer MiniLM student that took the int8 graph from 48 to 44 ms (profile, batch 1, seq 64), level with
PTQ dynamic."""
from __future__ import annotations

import collections
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper
from torch import nn

from compress.onnx.runtime import atomic_onnx_path, load_model, write_proto

log = logging.getLogger(__name__)

QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
# what ORT turns a quantized MatMul / Gemm into (the QDQ node-unit fusions and the contrib int8 ops)
INT8_MATMUL_OPS = ("QLinearMatMul", "MatMulInteger", "MatMulIntegerToFloat", "QGemm", "DynamicQuantizeMatMul",
                   "QAttention", "QOrderedMatMul")


def _consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    out: dict[str, list[onnx.NodeProto]] = collections.defaultdict(list)
    for node in graph.node:
        for name in node.input:
            out[name].append(node)
    return out


def _fold_weight_transposes(model: onnx.ModelProto) -> int:
    """DQ(int8 W, axis a) -> Transpose(perm [1, 0]) -> X  becomes  DQ(int8 W^T, axis 1 - a) -> X."""
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    cons = _consumers(graph)
    done = 0
    drop: list[onnx.NodeProto] = []
    for node in graph.node:
        if node.op_type != "DequantizeLinear" or node.input[0] not in inits:
            continue
        users = cons.get(node.output[0], [])
        if len(users) != 1 or users[0].op_type != "Transpose":
            continue
        tr = users[0]
        perm = next((list(a.ints) for a in tr.attribute if a.name == "perm"), [1, 0])
        w = numpy_helper.to_array(inits[node.input[0]])
        if w.ndim != 2 or perm != [1, 0] or len(cons.get(node.input[0], [])) != 1:
            continue
        inits[node.input[0]].CopyFrom(numpy_helper.from_array(np.ascontiguousarray(w.T), node.input[0]))
        axis = next((a for a in node.attribute if a.name == "axis"), None)
        if axis is None:  # ONNX's default axis is 1
            node.attribute.append(onnx.helper.make_attribute("axis", 0))
        else:
            axis.i = 1 - (axis.i % 2)
        # the Transpose's consumers read the DQ output instead
        for user in cons.get(tr.output[0], []):
            for i, name in enumerate(user.input):
                if name == tr.output[0]:
                    user.input[i] = node.output[0]
        for j, out in enumerate(graph.output):
            if out.name == tr.output[0]:
                out.name = node.output[0]
        drop.append(tr)
        done += 1
    for tr in drop:
        graph.node.remove(tr)
    return done


def _unique_activation_qdq(model: onnx.ModelProto) -> int:
    """Give each consumer of a shared activation Q -> DQ pair its own pair (same scale and zero point)."""
    graph = model.graph
    inits = {t.name for t in graph.initializer}
    cons = _consumers(graph)
    producers = {o: n for n in graph.node for o in n.output}
    added = 0
    new_nodes: list[tuple[onnx.NodeProto, list[onnx.NodeProto]]] = []
    for node in list(graph.node):
        if node.op_type != "DequantizeLinear" or node.input[0] in inits:
            continue
        q = producers.get(node.input[0])
        users = cons.get(node.output[0], [])
        if q is None or q.op_type != "QuantizeLinear" or len(users) < 2:
            continue
        extra: list[onnx.NodeProto] = []
        for k, user in enumerate(users[1:], start=1):
            q2 = onnx.NodeProto()
            q2.CopyFrom(q)
            q2.name = f"{q.name or q.output[0]}_u{k}"
            q2.output[0] = f"{q.output[0]}_u{k}"
            dq2 = onnx.NodeProto()
            dq2.CopyFrom(node)
            dq2.name = f"{node.name or node.output[0]}_u{k}"
            dq2.input[0] = q2.output[0]
            dq2.output[0] = f"{node.output[0]}_u{k}"
            for i, name in enumerate(user.input):
                if name == node.output[0]:
                    user.input[i] = dq2.output[0]
            extra += [q2, dq2]
            added += 1
        new_nodes.append((node, extra))
    # insert each copy right after the original DQ, so the node list stays topologically sorted
    for dq, extra in new_nodes:
        at = list(graph.node).index(dq) + 1
        for j, n in enumerate(extra):
            graph.node.insert(at + j, n)
    return added


def _split_gemm_bias(model: onnx.ModelProto) -> int:
    """Gemm(DQ(x), DQ(W), C float) becomes Add(Gemm(DQ(x), DQ(W)), C): ORT fuses a QDQ Gemm into QGemm only
    when its bias is absent or an int32 DequantizeLinear, and a float bias left the pooler and classifier in
    float (the tiny random models' zero biases are folded away by the exporter, so only trained models show it)."""
    graph = model.graph
    producers = {o: n for n in graph.node for o in n.output}
    done = 0
    for node in list(graph.node):
        if node.op_type != "Gemm" or len(node.input) < 3 or not node.input[2]:
            continue
        if any(producers.get(i) is None or producers[i].op_type != "DequantizeLinear" for i in node.input[:2]):
            continue
        bias, out = node.input[2], node.output[0]
        del node.input[2]
        node.output[0] = f"{out}_nobias"
        add = onnx.helper.make_node("Add", [node.output[0], bias], [out], name=f"{node.name or out}_bias")
        graph.node.insert(list(graph.node).index(node) + 1, add)
        done += 1
    return done


def place_qdq(model: onnx.ModelProto) -> dict[str, int]:
    """Rewrite an exported QDQ graph in place for ORT's int8 fusion (see the module doc); returns what changed."""
    return {"weight_transposes_folded": _fold_weight_transposes(model),
            "activation_qdq_split": _unique_activation_qdq(model),
            "gemm_biases_split": _split_gemm_bias(model)}


def float_weights(model: onnx.ModelProto, min_elements: int = 1024) -> list[str]:
    """Float matrices (2-D or more) of at least `min_elements` values: weights the int8 export should have folded
    (1-D vectors are biases, LayerNorm parameters and scales, e.g. the per-row scales of an int8 embedding)."""
    floats = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16)
    return [t.name for t in model.graph.initializer
            if t.data_type in floats and len(t.dims) >= 2 and int(np.prod(t.dims)) >= min_elements]


def export_qat_onnx(model: nn.Module, example_inputs: dict[str, Any], path: Path, *, task: str,
                    opset: int = 18) -> dict[str, int]:
    """Export the fake-quant `model` to an int8 QDQ ONNX file at `path` (atomically); returns `place_qdq`'s counts."""
    import tempfile

    from compress.onnx.export import export_onnx
    from compress.quant.fake import export_mode

    path = Path(path)
    with tempfile.TemporaryDirectory(prefix="compress-qat-", dir=path.parent) as td:
        raw = Path(td) / "raw.onnx"
        with export_mode(model):
            export_onnx(model, example_inputs, raw, task=task, opset=opset)
        proto = load_model(raw)
        changes = place_qdq(proto)
        with atomic_onnx_path(path) as tmp:
            write_proto(proto, tmp)
    log.info("qat export %s: %s", path.name, changes)
    return changes


def optimized_op_counts(path: Path, out: Path, *, threads: int = 1) -> dict[str, int]:
    """Op counts of the graph ONNX Runtime actually runs: the session's optimised model (all optimisations,
    CPU provider) written to `out` (`SessionOptions.optimized_model_filepath`)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.optimized_model_filepath = str(out)
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return dict(collections.Counter(n.op_type for n in onnx.load(str(out)).graph.node))


def float_matmuls_behind_qdq(path: Path) -> list[str]:
    """MatMul / Gemm nodes of an optimised graph that still read a DequantizeLinear output: a Q/DQ pair left
    around a float MatMul (ORT did not fuse it into an integer kernel)."""
    graph = onnx.load(str(path)).graph
    producers = {o: n for n in graph.node for o in n.output}
    bad = []
    for n in graph.node:
        if n.op_type in ("MatMul", "Gemm", "FusedMatMul", "FusedGemm"):
            if any(producers.get(i) is not None and producers[i].op_type == "DequantizeLinear" for i in n.input):
                bad.append(n.name or n.output[0])
    return bad


@dataclass
class FusedExport:
    parity: Any  # compress.onnx.parity.ParityResult of the file written
    fused: bool  # ORT's transformer optimizer fused the graph (and parity held after it)
    changes: dict[str, int]  # place_qdq's counts
    rejected: Any = None  # the parity of a fused graph that failed it (the unfused one was kept)


def export_qat_fused(model: nn.Module, example_inputs: dict[str, Any], check_inputs: dict[str, Any], path: Path, *,
                     task: str, opset: int = 18, atol: float = 0.05, min_cosine: float = 0.999,
                     optimize: bool = True) -> FusedExport:
    """`export_qat_onnx`, parity of ORT's int8 output against the fake-quant `model` on `check_inputs`, then (with
    `optimize`, for the families ORT's transformer optimizer knows) the fused graph (SkipLayerNorm / BiasGelu take
    the bias adds in), kept only if parity still holds. The qat pass and benchmarks/quant.py both export so."""
    from compress.models import get_adapter
    from compress.onnx.export import optimize_onnx
    from compress.onnx.parity import check_parity
    from compress.onnx.export import FUSION_MODEL_TYPES

    path = Path(path)
    changes = export_qat_onnx(model, example_inputs, path, task=task, opset=opset)
    parity = check_parity(model, path, check_inputs, task=task, atol=atol, min_cosine=min_cosine)
    mtype = FUSION_MODEL_TYPES.get(getattr(getattr(model, "config", None), "model_type", ""))
    out = FusedExport(parity, False, changes)
    if optimize and mtype and parity.ok:
        ad = get_adapter(model)
        tmp = path.with_name(path.stem + ".fused.onnx")
        if optimize_onnx(path, tmp, model_type=mtype, num_heads=ad.num_heads, hidden_size=ad.hidden_size):
            p2 = check_parity(model, tmp, check_inputs, task=task, atol=atol, min_cosine=min_cosine)
            if p2.ok:
                tmp.replace(path)
                out.parity, out.fused = p2, True
            else:
                tmp.unlink()
                out.rejected = p2
    return out
