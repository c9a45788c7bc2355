"""int4 weight-only quantization with ONNX Runtime's MatMulNBits (onnxruntime.quantization.matmul_nbits_quantizer):
the weights of each MatMul with a constant 2-D weight are stored as 4-bit blocks with a scale (and, asymmetric,
a zero point) per block of `block_size` input rows; activations stay float. The LM head and the embedding
tables keep the precision the caller chooses."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import onnx
from onnx import numpy_helper

from compress.errors import InputError
from compress.onnx.runtime import atomic_onnx_path, load_model, quiet_logs, write_proto

log = logging.getLogger(__name__)

Int4Part = Literal["int4", "fp32"]


@dataclass(frozen=True)
class WeightMatMul:
    node: str
    weight: str
    in_dim: int
    out_dim: int


def weight_matmuls(model: onnx.ModelProto) -> list[WeightMatMul]:
    """The MatMul nodes whose second input is a constant 2-D weight (what MatMulNBits can replace)."""
    inits = {t.name: t for t in model.graph.initializer}
    found = []
    for n in model.graph.node:
        if n.op_type == "MatMul" and len(n.input) == 2 and n.input[1] in inits and len(inits[n.input[1]].dims) == 2:
            k, m = inits[n.input[1]].dims
            found.append(WeightMatMul(n.name, n.input[1], int(k), int(m)))
    return found


def _attr(node: onnx.NodeProto, name: str, default: float | int) -> float | int:
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def matmul_form(model: onnx.ModelProto) -> int:
    """Rewrite, in place, the weight products MatMulNBits cannot take into MatMuls with a constant weight:
    Gemm(x, W[, b]) (GPT-2's Conv1D, Linear with bias) -> MatMul(x, W') (+ Add b), and MatMul(x, Transpose(E))
    (a tied LM head reading the embedding table) -> MatMul(x, E^T as its own initializer). Returns how many."""
    inits = {t.name: t for t in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    nodes: list[onnx.NodeProto] = []
    rewritten = 0
    for n in model.graph.node:
        if (n.op_type == "Gemm" and n.input[1] in inits and not _attr(n, "transA", 0)
                and _attr(n, "alpha", 1.0) == 1.0 and _attr(n, "beta", 1.0) == 1.0):
            w = numpy_helper.to_array(inits[n.input[1]])
            if _attr(n, "transB", 0):
                w = w.T
            wname = f"{n.input[1]}_matmul"
            model.graph.initializer.append(numpy_helper.from_array(w.copy(), wname))
            prod = f"{n.output[0]}_matmul" if len(n.input) > 2 and n.input[2] else n.output[0]
            nodes.append(onnx.helper.make_node("MatMul", [n.input[0], wname], [prod], name=f"{n.name}_MatMul"))
            if prod != n.output[0]:
                nodes.append(onnx.helper.make_node("Add", [prod, n.input[2]], [n.output[0]], name=f"{n.name}_Add"))
            rewritten += 1
            continue
        t = producers.get(n.input[1]) if n.op_type == "MatMul" and len(n.input) == 2 else None
        if (t is not None and t.op_type == "Transpose" and t.input[0] in inits
                and len(inits[t.input[0]].dims) == 2 and list(_attr(t, "perm", [1, 0])) == [1, 0]):
            wname = f"{t.input[0]}_transposed"
            if wname not in inits:
                inits[wname] = numpy_helper.from_array(numpy_helper.to_array(inits[t.input[0]]).T.copy(), wname)
                model.graph.initializer.append(inits[wname])
            n.input[1] = wname
            rewritten += 1
        nodes.append(n)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    if rewritten:  # drop initializers nothing reads any more (Gemm weights, the Transposes' outputs)
        used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
        keep_nodes = [n for n in model.graph.node if n.op_type != "Transpose" or any(o in used for o in n.output)]
        del model.graph.node[:]
        model.graph.node.extend(keep_nodes)
        used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
        keep = [t for t in model.graph.initializer if t.name in used]
        del model.graph.initializer[:]
        model.graph.initializer.extend(keep)
    return rewritten


def lm_head(model: onnx.ModelProto, matmuls: list[WeightMatMul]) -> WeightMatMul | None:
    """The MatMul that makes the logits: the last one whose output width is the vocabulary (the logits' last
    dim), None when the graph has no `logits` output of known width."""
    out = next((o for o in model.graph.output if o.name == "logits"), None)
    dims = out.type.tensor_type.shape.dim if out is not None else []
    vocab = dims[-1].dim_value if dims and dims[-1].HasField("dim_value") else None
    heads = [m for m in matmuls if vocab and m.out_dim == vocab]
    return heads[-1] if heads else None


def check_block_size(block_size: int, matmuls: list[WeightMatMul], field: str = "ptq.int4.block_size") -> None:
    if block_size < 16 or block_size & (block_size - 1):
        raise InputError(f"{field}: {block_size} is not a power of two >= 16 (MatMulNBits' blocks); use 32, 64 or 128")
    for m in matmuls:
        if m.in_dim % block_size:
            raise InputError(f"{field}: {block_size} does not divide the input dimension {m.in_dim} of MatMul "
                             f"'{m.node}' (weight {m.weight}); use a power of two that divides it, e.g. "
                             f"{_largest_divisor(m.in_dim)}")


def _largest_divisor(k: int) -> int:
    b = 16
    while k % (b * 2) == 0 and b < 128:
        b *= 2
    return b if k % b == 0 else 16


def quantize_int4(src: Path, dst: Path, *, block_size: int = 32, symmetric: bool = True,
                  accuracy_level: int | None = None, lm_head_precision: Int4Part = "int4",
                  embeddings: Int4Part = "fp32") -> dict[str, int]:
    """Write the int4 weight-only model of `src` to `dst` (atomically). Returns counts: quantized MatMuls,
    MatMuls left float (the LM head when `lm_head_precision` is fp32) and int4 embedding tables.

    `accuracy_level` (MatMulNBits): 0/None unset, 1 fp32, 2 fp16, 3 bf16, 4 int8 compute of the activations."""
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    from compress.onnx.quantize import refuse_quantized

    src, dst = Path(src).resolve(), Path(dst).resolve()
    refuse_quantized(src)
    if accuracy_level is not None and accuracy_level not in (0, 1, 2, 3, 4):
        raise InputError(f"ptq.int4.accuracy_level: {accuracy_level} is not 0, 1, 2, 3 or 4 (MatMulNBits)")
    model = load_model(src)
    model.graph.ClearField("value_info")
    matmul_form(model)
    matmuls = weight_matmuls(model)
    if not matmuls:
        raise InputError(f"ptq: {src.name} has no MatMul with a constant weight to quantize to int4")
    head = lm_head(model, matmuls)
    exclude = [head.node] if head is not None and lm_head_precision == "fp32" else []
    check_block_size(block_size, [m for m in matmuls if m.node not in exclude])
    ops: tuple[str, ...] = ("MatMul", "Gather") if embeddings == "int4" else ("MatMul",)
    if embeddings == "int4":
        inits = {t.name: t for t in model.graph.initializer}
        for n in model.graph.node:
            if n.op_type == "Gather" and n.input[0] in inits and len(inits[n.input[0]].dims) == 2:
                dim = int(inits[n.input[0]].dims[1])
                if dim % block_size:
                    raise InputError(f"ptq.int4.block_size: {block_size} does not divide the embedding width {dim} "
                                     f"of Gather '{n.name}'; use one that divides it or int4.embeddings: fp32")
    cfg = DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=symmetric, accuracy_level=accuracy_level,
                                       op_types_to_quantize=ops, quant_axes=(("MatMul", 0), ("Gather", 1)))
    with quiet_logs("onnxruntime.quantization.matmul_nbits_quantizer", "onnxruntime.quantization", root=True):
        q = MatMulNBitsQuantizer(model, block_size=block_size, is_symmetric=symmetric, accuracy_level=accuracy_level,
                                 nodes_to_exclude=exclude, op_types_to_quantize=ops, algo_config=cfg)
        q.process()
    out = q.model.model
    with atomic_onnx_path(dst) as tmp:
        write_proto(out, tmp)
    counts = {"matmul_nbits": sum(n.op_type == "MatMulNBits" for n in out.graph.node),
              "float_matmuls": sum(n.op_type == "MatMul" for n in out.graph.node),
              "int4_embeddings": sum(n.op_type == "GatherBlockQuantized" for n in out.graph.node)}
    log.info("int4 weight-only (block %d, %s): %s -> %s, %s", block_size, "symmetric" if symmetric else "asymmetric",
             src.name, dst.name, counts)
    return counts

