"""Post-training int8 quantization with onnxruntime.quantization: dynamic (int8 weights, activations quantized at
run time) and static QDQ (calibrated on real batches). Outputs are written atomically."""
from __future__ import annotations

import io
import itertools
import logging
import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, redirect_stdout
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_dynamic,
    quantize_static,
)

from compress.errors import InputError
from compress.onnx.runtime import atomic_onnx_path, load_model, prepare_feed, quiet_logs, write_proto

log = logging.getLogger(__name__)

CALIBRATION_METHODS = {
    "minmax": CalibrationMethod.MinMax,
    "entropy": CalibrationMethod.Entropy,
    "percentile": CalibrationMethod.Percentile,
}
DEFAULT_OP_TYPES = ("MatMul", "Gemm")


QUANTIZED_OPS = ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "MatMulInteger", "QLinearMatMul",
                 "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "QGemm", "ConvInteger", "QLinearConv", "QAttention")


def refuse_quantized(path: Path, where: str = "ptq") -> None:
    """InputError (exit 2) when the graph at `path` already holds Q/DQ or integer ops (made by ptq or qat):
    quantizing it again would quantize the dequantized weights a second time."""
    model = onnx.load(str(path), load_external_data=False)
    found = sorted({n.op_type for n in model.graph.node if n.op_type in QUANTIZED_OPS})
    if found:
        raise InputError(f"{where}: {Path(path).name} is already quantized (it holds {', '.join(found)}); "
                         "give it the fp32 model (the export pass's student.onnx)")


@contextmanager
def _cwd(path: Path) -> Iterator[None]:
    """Run a block with `path` as the working directory (quant_pre_process drops temp files in the cwd)."""
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def _clean_copy(src: Path, folder: Path, name: str = "input.onnx") -> tuple[Path, bool]:
    """A copy of `src` in `folder` without value_info (the dynamo exporter's shape annotations trip the
    quantizer), weights inline when they fit. Returns the path and whether it uses external data."""
    model = load_model(src)
    model.graph.ClearField("value_info")
    path = folder / name
    external = write_proto(model, path)
    return path, external


def quantize_dynamic_int8(
    src: Path,
    dst: Path,
    *,
    per_channel: bool = False,
    reduce_range: bool = False,
    op_types: Sequence[str] = DEFAULT_OP_TYPES,
) -> Path:
    """Dynamic int8: weights of `op_types` (MatMul/Gemm) stored as QInt8, activations quantized at run time
    (DynamicQuantizeLinear + MatMulInteger). `reduce_range` (7-bit weights) avoids saturation on CPUs without VNNI."""
    src, dst = Path(src).resolve(), Path(dst).resolve()
    refuse_quantized(src)
    with tempfile.TemporaryDirectory(prefix="compress-qdyn-") as td:
        clean, external = _clean_copy(src, Path(td))
        with quiet_logs(root=True), atomic_onnx_path(dst) as tmp:
            quantize_dynamic(
                model_input=str(clean), model_output=str(tmp), op_types_to_quantize=list(op_types),
                per_channel=per_channel, reduce_range=reduce_range, weight_type=QuantType.QInt8,
                use_external_data_format=external, extra_options={"MatMulConstBOnly": True, "DefaultTensorType": onnx.TensorProto.FLOAT},
            )
    log.info("dynamic int8: %s -> %s", src.name, dst.name)
    return dst


class CalibrationReader(CalibrationDataReader):
    """The calibration reader: feeds batches (dicts of torch tensors or numpy arrays, as the collate functions
    make them) to ORT's calibrator as exactly the graph's inputs, in its dtypes. Labels and other extra keys are
    dropped, a missing attention_mask (ones) or token_type_ids (zeros) is filled in, any other missing input is
    an InputError that names it."""

    def __init__(self, batches: Iterable[Mapping[str, Any]], specs: Mapping[str, tuple[np.dtype | None, list[Any]]],
                 max_batches: int | None = None):
        self.batches = list(itertools.islice(batches, max_batches))
        self.specs = specs
        self._i = 0

    @classmethod
    def for_model(cls, path: Path, batches: Iterable[Mapping[str, Any]], max_batches: int | None = None) -> CalibrationReader:
        """A reader shaped by the inputs the ONNX file at `path` declares."""
        return cls(batches, _graph_input_specs(onnx.load(str(path), load_external_data=False)), max_batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._i >= len(self.batches):
            return None
        batch = self.batches[self._i]
        self._i += 1
        return prepare_feed(batch, self.specs)

    def rewind(self) -> None:
        self._i = 0

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        """The prepared feeds, without moving the reader."""
        return (prepare_feed(b, self.specs) for b in self.batches)


def _graph_input_specs(model: onnx.ModelProto) -> dict[str, tuple[np.dtype | None, list[Any]]]:
    inits = {t.name for t in model.graph.initializer}
    specs: dict[str, tuple[np.dtype | None, list[Any]]] = {}
    for inp in model.graph.input:
        if inp.name in inits:
            continue
        tt = inp.type.tensor_type
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)) if tt.elem_type else None
        shape = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in tt.shape.dim]
        specs[inp.name] = (dtype, shape)
    return specs


def _pre_process(src: Path, dst: Path, external: bool) -> bool:
    """ORT's quantization pre-processing: symbolic shape inference (it knows ORT's fused contrib ops, which
    plain ONNX shape inference does not: without it the calibrator skips their outputs and bias quantization
    fails), ONNX shape inference and basic graph optimisation. Tried with symbolic shape inference (auto-merging
    conflicting dims), then without; returns False, leaving `dst` unwritten, when both fail: static
    quantization then runs on the graph as it is. Runs in dst's folder: it leaves temp files in the cwd."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    common = dict(save_as_external_data=external, all_tensors_to_one_file=True, external_data_location=f"{dst.name}.data")
    attempts = (dict(skip_symbolic_shape=False, auto_merge=True, guess_output_rank=True), dict(skip_symbolic_shape=True))
    for opts in attempts:
        try:
            with _cwd(dst.parent), quiet_logs(root=True), redirect_stdout(io.StringIO()):
                quant_pre_process(str(src), str(dst), **opts, **common)  # type: ignore[arg-type]
            if dst.is_file():
                return True
        except Exception as exc:  # noqa: BLE001 - shape inference fails on some graphs; quantization still works
            log.debug("quantization pre-processing %s failed: %s: %s", opts, type(exc).__name__, str(exc).splitlines()[:1])
    log.warning("quantization pre-processing failed; quantizing %s as it is", src.name)
    return False


def same_length(batches: list[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The batches with every 2-D input right-padded with zeros to the longest sequence among them (pad token
    0, attention mask 0). ORT's histogram calibrators (entropy, percentile) stack each tensor's values over the
    batches with `np.asarray`, which fails on batches padded to different lengths."""
    longest = max((int(np.asarray(v).shape[1]) for b in batches for v in b.values() if np.asarray(v).ndim == 2),
                  default=0)
    out = []
    for b in batches:
        row: dict[str, Any] = {}
        for k, v in b.items():
            a = np.asarray(v)
            if a.ndim == 2 and a.shape[1] < longest:
                a = np.pad(a, ((0, 0), (0, longest - a.shape[1])))
            row[k] = a
        out.append(row)
    return out


ENTROPY_BINS = 512  # histogram bins for the KL (entropy) threshold search; 128 quantized bins (int8)


def _entropy_ranges(model: Path, ops: list[str] | None, reader: CalibrationReader, folder: Path, external: bool) -> Path:
    """Entropy (KL) calibration with a histogram finer than the quantized one, saved as ORT's calibration cache.

    quantize_static cannot pass histogram sizes to its entropy calibrator, whose defaults (128 bins, 128
    quantized bins) leave a single candidate threshold: the min-max range. So we calibrate here."""
    from onnxruntime.quantization.calibrate import create_calibrator, save_tensors_data
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    calibrator = create_calibrator(
        model, ops or sorted(set(QLinearOpsRegistry) | set(QDQRegistry)),
        augmented_model_path=str(folder / "augmented.onnx"), calibrate_method=CalibrationMethod.Entropy,
        use_external_data_format=external,
        extra_options={"num_bins": ENTROPY_BINS, "num_quantized_bins": 128, "symmetric": False},
    )
    calibrator.collect_data(reader)
    ranges = calibrator.compute_data()
    del calibrator
    cache = folder / "calibration.json"
    save_tensors_data(ranges, cache)
    return cache


def quantize_static_qdq(
    src: Path,
    dst: Path,
    calibration: Iterable[Mapping[str, Any]],
    *,
    per_channel: bool = True,
    method: str = "minmax",
    op_types: Sequence[str] | None = DEFAULT_OP_TYPES,
    pre_process: bool = True,
    activations: str = "uint8",
    reduce_range: bool = False,
    weight_matmuls_only: bool = False,
    float_outputs: bool = False,
) -> Path:
    """Static int8 in QDQ format: QuantizeLinear/DequantizeLinear pairs around `op_types` (None: every op ORT
    can quantize), activation ranges calibrated with `method` (minmax, entropy, percentile) over the given
    batches (dicts of input name -> array; extra keys are ignored). Weights QInt8 (per channel by default),
    activations QUInt8 (`activations="uint8"`, the U8S8 kernels ONNX Runtime runs fast on x86: 8.2 vs 41 ms
    p50 for S8S8 on a 3-layer MiniLM, 2 threads) or QInt8 (`"int8"`).
    `reduce_range`: 7-bit weights and activations (x86 CPUs without VNNI).
    `weight_matmuls_only`: quantize only MatMuls with a constant weight, leaving the attention products of two
    activations in float (the edge profile, docs/edge.md).
    `float_outputs`: no QuantizeLinear on the outputs of the quantized MatMul/Gemm: ORT then runs DQ -> MatMul as one
    MatMulIntegerToFloat kernel instead of QLinearMatMul followed by a DequantizeLinear back to float for the bias Add,
    LayerNorm or GELU after it (docs/quantization.md).
    Pre-processing runs in a temporary folder, so nothing is left in the working directory."""
    if activations not in ("uint8", "int8"):
        raise InputError(f"ptq.activations: '{activations}' is not uint8 or int8")
    src, dst = Path(src).resolve(), Path(dst).resolve()
    if method not in CALIBRATION_METHODS:
        raise InputError(f"ptq.calibration: '{method}' is not one of {', '.join(CALIBRATION_METHODS)}")
    refuse_quantized(src)
    batches = list(calibration)
    if not batches:
        raise InputError("ptq: static quantization needs at least one calibration batch; give data.calibration (or data.train)")
    if method != "minmax":
        batches = same_length(batches)
    with tempfile.TemporaryDirectory(prefix="compress-qdq-") as td:
        folder = Path(td)
        clean, external = _clean_copy(src, folder)
        model_in = clean
        if pre_process and _pre_process(clean, folder / "pre.onnx", external):
            model_in = folder / "pre.onnx"
        reader = CalibrationReader.for_model(model_in, batches)
        ops = list(op_types) if op_types else None
        extra: dict[str, Any] = {}
        if float_outputs:  # DQ -> MatMul with a float output: ORT runs it as one MatMulIntegerToFloat kernel
            extra["OpTypesToExcludeOutputQuantization"] = [op for op in (ops or DEFAULT_OP_TYPES) if op in ("MatMul", "Gemm")]
        cache: Path | None = None
        # ORT's MatMulConstBOnly is not read by its QDQ quantizer: the MatMuls of two activations are excluded by name
        skip = _activation_matmuls(model_in) if weight_matmuls_only else []
        # the entropy/percentile calibrators print() their progress: kept out of the user's terminal
        with _cwd(folder), quiet_logs(root=True), redirect_stdout(io.StringIO()):
            if method == "percentile":
                extra["CalibPercentile"] = 99.99
            elif method == "entropy":
                cache = _entropy_ranges(model_in, ops, reader, folder, external)
            args = dict(model_input=str(model_in), quant_format=QuantFormat.QDQ, op_types_to_quantize=ops,
                        per_channel=per_channel, activation_type=QuantType.QUInt8 if activations == "uint8" else QuantType.QInt8,
                        weight_type=QuantType.QInt8,
                        use_external_data_format=external, calibrate_method=CALIBRATION_METHODS[method],
                        calibration_cache_path=cache, reduce_range=reduce_range, nodes_to_exclude=skip)
            try:
                with atomic_onnx_path(dst) as tmp:
                    reader.rewind()
                    quantize_static(model_output=str(tmp), calibration_data_reader=None if cache else reader,
                                    extra_options=extra, **args)  # type: ignore[arg-type]
            except ValueError as exc:
                if "quantizing bias" not in str(exc):
                    raise
                # a Gemm/Conv input the calibrator could not see (no type known for it): keep biases in float
                log.warning("static quantization: %s; retrying with float biases", str(exc).splitlines()[0])
                with atomic_onnx_path(dst) as tmp:
                    reader.rewind()
                    quantize_static(model_output=str(tmp), calibration_data_reader=None if cache else reader,
                                    extra_options=dict(extra, QuantizeBias=False), **args)  # type: ignore[arg-type]
    log.info("static QDQ int8 (%s, %d batches, per_channel=%s): %s -> %s", method, len(batches), per_channel, src.name, dst.name)
    return dst


def _activation_matmuls(path: Path) -> list[str]:
    """Names of the MatMul nodes whose B input is not a weight (initializer or Constant)."""
    g = onnx.load(str(path), load_external_data=False).graph
    consts = {t.name for t in g.initializer} | {o for n in g.node if n.op_type == "Constant" for o in n.output}
    return [n.name for n in g.node if n.op_type == "MatMul" and n.name and n.input[1] not in consts]


def quantized_op_counts(path: Path) -> dict[str, int]:
    """Counts of the integer / quantization ops in a model: a quick check that quantization happened."""
    kinds = {"MatMulInteger", "DynamicQuantizeLinear", "QuantizeLinear", "DequantizeLinear", "QLinearMatMul",
             "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "QGemm", "ConvInteger", "QLinearConv"}
    model = onnx.load(str(path), load_external_data=False)
    counts: dict[str, int] = {}
    for node in model.graph.node:
        if node.op_type in kinds:
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts



INT8_MATMULS = ("QLinearMatMul", "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "MatMulInteger", "QGemm", "QAttention")
FLOAT_MATMULS = ("MatMul", "FusedMatMul", "Gemm", "FusedGemm")


def runtime_summary(path: Path, optimized: Path, *, threads: int = 1) -> dict[str, int]:
    """What ONNX Runtime actually runs for a quantized model (the CPU session's optimized graph, written to
    `optimized`): int8 and float MatMul kernels, the standalone (Dynamic)QuantizeLinear and DequantizeLinear nodes
    left as float<->int8 conversions, and the Adds (bias adds a fused kernel would take in)."""
    from compress.quant.export import optimized_op_counts

    c = optimized_op_counts(path, optimized, threads=threads)
    optimized.unlink(missing_ok=True)
    return {"int8_matmuls": sum(c.get(k, 0) for k in INT8_MATMULS),
            "float_matmuls": sum(c.get(k, 0) for k in FLOAT_MATMULS),
            "quantize": c.get("QuantizeLinear", 0) + c.get("DynamicQuantizeLinear", 0),
            "dequantize": c.get("DequantizeLinear", 0), "add": c.get("Add", 0), "nodes": sum(c.values())}
