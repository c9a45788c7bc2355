"""Edge targets: ONNX students for phone accelerators (NNAPI on Android, CoreML on Apple) run by ORT Mobile.

What an edge export changes against the server export (docs/edge.md):
- fixed input shapes (batch, sequence; the image side for vision) taken from `target`;
- the attention mask is a plain additive mask built from `attention_mask` by Reshape, Cast, Sub and Mul (the
  model's own mask code gives IsNaN / GatherND / Range / Expand / And / Where / GreaterOrEqual, which the
  mobile EPs lack), passed as a prepared 4-D mask to the eager attention path;
- GELU in its tanh form (NNAPI has no Erf); LayerNormalization spelled out as ReduceMean / Sub / Pow / Add /
  Sqrt / Div / Mul / Add (NNAPI and CoreML's NeuralNetwork format have no LayerNormalization; ORT's CPU EP
  fuses the pattern back at load time); the pooler's `hidden[:, 0]` as Slice + Squeeze instead of a Gather;
- no contrib-op fusion in the saved file;
- int8 only as static QDQ (ptq `methods: [static]`, or qat: `export_qat_edge`);
- next to each `.onnx`: the ORT-format `.ort` (runtime optimisation style, ORT's recommendation for NNAPI /
  CoreML) and its `required_operators.config` for a minimal ORT Mobile build.

`evaluate` runs ORT's mobile usability analysis (onnxruntime.tools.mobile_helpers) on each edge model:
node coverage and partition count per EP, into report.json, with the `min_ep_coverage` / `max_ep_partitions`
gates."""
from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper
from torch import nn

from compress.errors import InputError

log = logging.getLogger(__name__)

# the ops the model's own mask code leaves in the graph, none of which NNAPI / CoreML (NeuralNetwork) take
MASK_OPS = ("IsNaN", "GatherND", "Range", "Expand", "And", "Where", "GreaterOrEqual")
MASK_VALUE = -10000.0  # additive mask of padded keys; representable in fp16 (CoreML, NNAPI relaxed precision)

# mobile EPs the usability analysis knows: our key -> (ORT provider name, ORT short names accepted)
MOBILE_EPS = {
    "nnapi": ("NnapiExecutionProvider", ("nnapi",)),
    "coreml": ("CoreMLExecutionProvider", ("coreml",)),
}
# what `evaluate` reports per EP: CoreML in its two model formats (MLProgram is the one ORT recommends on iOS 15+)
ANALYSES = {
    "nnapi": ("nnapi", "nnapi_supported_ops.md", 999),
    "coreml": ("coreml", "coreml_supported_mlprogram_ops.md", 5),
    "coreml-neuralnetwork": ("coreml", "coreml_supported_neuralnetwork_ops.md", 5),
}
# the EPs that run QDQ int8 graphs (NNAPI maps QuantizeLinear / DequantizeLinear; CoreML's EP takes float graphs
# and runs them in fp16 itself): which of the run's models each EP's gates look at
TAKES_QDQ = {"nnapi": True, "coreml": False, "coreml-neuralnetwork": False}


# ---------------------------------------------------------------------------------------------- names
def resolve_ep(name: str, where: str = "target.edge.eps") -> str:
    """Our key (`nnapi`, `coreml`) for an EP name as users write it (`NNAPI`, `nnapi`, `NnapiExecutionProvider`);
    InputError naming the field for a name ONNX Runtime does not know or one with no mobile analysis."""
    import onnxruntime as ort

    low = str(name).strip().lower()
    for key, (provider, shorts) in MOBILE_EPS.items():
        if low == provider.lower() or low in shorts:
            return key
    known = {p.lower(): p for p in ort.get_all_providers()}
    full = known.get(low) or known.get(low + "executionprovider")
    if full is None:
        raise InputError(f"{where}: '{name}' is not an execution provider ONNX Runtime knows; "
                         f"use one of the mobile EPs: nnapi, coreml")
    raise InputError(f"{where}: '{name}' ({full}) has no mobile usability analysis in ONNX Runtime; "
                     f"use nnapi or coreml")


def analysis_key(name: str, where: str) -> str:
    """A key of `ANALYSES` for a gate's EP name (`nnapi`, `coreml`, `coreml-neuralnetwork`)."""
    low = str(name).strip().lower().replace("_", "-")
    if low in ANALYSES:
        return low
    return resolve_ep(name, where)


def fixed_shape(value: Any, field: str) -> int:
    """A positive integer shape, else an InputError that says an edge profile needs fixed shapes."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(f"{field}: {value!r} is not a fixed size; an edge profile needs fixed input shapes "
                         f"(NNAPI has no dynamic shapes): give a positive integer, e.g. 1 for batch_size, 64 for seq_len")
    return value


def profile(run: Any) -> tuple[list[str], int, int] | None:
    """(EP keys, batch, seq) of the run's edge profile (`target.edge`), None for a server run. InputError naming
    the field for a dynamic shape or an EP name ORT does not know."""
    edge = run.target.edge
    if edge is None:
        return None
    eps = list(dict.fromkeys(resolve_ep(e, f"target.edge.eps[{i}]") for i, e in enumerate(edge.eps)))
    batch = fixed_shape(run.target.batch_size if edge.batch_size is None else edge.batch_size, "target.edge.batch_size")
    seq = fixed_shape(run.target.seq_len if edge.seq_len is None else edge.seq_len, "target.edge.seq_len")
    return eps, batch, seq


def check_profile(run: Any, file: str) -> None:
    """The config checks of an edge run (`compress validate`, `compress run` before anything starts): the profile
    itself, the EP gates' names, and that EP gates have an edge profile to measure. ConfigError, one line."""
    from compress.errors import ConfigError

    try:
        prof = profile(run)
        for i, p in enumerate(run.passes):
            opts = p.options()
            if prof is not None and p.type == "qat" and (opts.get("quantize_qk") or opts.get("quantize_attention_probs")):
                raise InputError(f"passes[{i}] (qat): quantize_qk / quantize_attention_probs hook the attention "
                                 "function, which the edge graph replaces by eager attention; turn them off for an "
                                 "edge target")
        for gate in ("min_ep_coverage", "max_ep_partitions"):
            limits = getattr(run.gates, gate) or {}
            if limits and prof is None:
                raise InputError(f"gates.{gate}: only an edge run measures EP coverage; set target.edge "
                                 "(e.g. target: {edge: {eps: [nnapi, coreml]}}) or remove the gate")
            for name in limits:
                analysis_key(name, f"gates.{gate}.{name}")
    except ConfigError:
        raise
    except InputError as exc:
        raise ConfigError(f"{file}: {exc}") from None


# ---------------------------------------------------------------------------------------------- export
class EdgeModule(nn.Module):
    """The model as an edge export sees it: a 2-D `attention_mask` becomes the additive 4-D mask
    `(1 - mask) * MASK_VALUE` shaped [batch, 1, 1, seq] (Reshape, Cast, Sub, Mul: opset ops every mobile EP has),
    passed to the model as a prepared mask (transformers returns a 4-D mask as is)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.config = getattr(model, "config", None)

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, pixel_values: torch.Tensor | None = None) -> Any:
        kwargs: dict[str, Any] = {}
        if input_ids is not None:
            kwargs["input_ids"] = input_ids
        if token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        if pixel_values is not None:
            kwargs["pixel_values"] = pixel_values
        if attention_mask is not None:
            b, n = attention_mask.shape
            keep = attention_mask.reshape(b, 1, 1, n).to(torch.float32)
            kwargs["attention_mask"] = (1.0 - keep) * MASK_VALUE
        return self.model(**kwargs)


def _gelu_sites(model: nn.Module) -> list[tuple[nn.Module, str, nn.Module]]:
    from transformers.activations import GELUActivation

    sites = []
    for mod in model.modules():
        for name, child in mod.named_children():
            exact_gelu = isinstance(child, nn.GELU) and child.approximate == "none"
            if exact_gelu or type(child) is GELUActivation:
                sites.append((mod, name, child))
    return sites


@contextlib.contextmanager
def edge_forward(model: nn.Module) -> Iterator[EdgeModule]:
    """The model switched to what an edge graph computes (eager attention, tanh GELU) and wrapped in EdgeModule;
    switched back on exit. PyTorch parity of the edge export is measured inside this block."""
    from compress.models.base import _restore_attn_implementation, _set_attn_implementation

    saved = _set_attn_implementation(model, "eager")
    sites = _gelu_sites(model)
    for mod, name, _ in sites:
        setattr(mod, name, nn.GELU(approximate="tanh"))
    try:
        yield EdgeModule(model).eval()
    finally:
        for mod, name, old in sites:
            setattr(mod, name, old)
        if saved is not None:
            _restore_attn_implementation(model, saved)


def fit_inputs(inputs: Mapping[str, Any], batch: int, seq: int | None) -> dict[str, np.ndarray]:
    """Inputs cut or padded to exactly `batch` rows and (text) `seq` positions: pad token 0, attention 0; rows
    past the data repeat the last one. Images keep their size (the model's)."""
    out: dict[str, np.ndarray] = {}
    for k, v in inputs.items():
        a = v.detach().cpu().numpy() if hasattr(v, "detach") else np.asarray(v)
        if a.shape[0] < batch:
            a = np.concatenate([a, np.repeat(a[-1:], batch - a.shape[0], axis=0)])
        a = a[:batch]
        if seq is not None and a.ndim == 2 and k != "pixel_values":
            a = a[:, :seq] if a.shape[1] >= seq else np.pad(a, ((0, 0), (0, seq - a.shape[1])))
        out[k] = np.ascontiguousarray(a)
    return out


def export_edge(model: nn.Module, example_inputs: Mapping[str, Any], path: Path, *, task: str, batch: int,
                seq: int | None, opset: int = 18) -> Path:
    """The edge export of `model` at `path`: fixed shapes [batch, seq] (text) from `example_inputs` cut or padded
    to them, the EdgeModule mask, tanh GELU, eager attention, then `simplify_for_mobile`. Written atomically."""
    from compress.onnx.export import export_onnx

    inputs = {k: torch.from_numpy(v) for k, v in fit_inputs(example_inputs, batch, seq).items()}
    with edge_forward(model) as edge:
        export_onnx(edge, inputs, path, task=task, opset=opset, dynamic=False)
    simplify_for_mobile(path)
    left = sorted({n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node} & set(MASK_OPS))
    if left:
        raise InputError(f"export: the edge graph of {type(model).__name__} still holds {', '.join(left)} "
                         "(its mask or attention code does not take a prepared 4-D mask); see docs/edge.md")
    return path


# ---------------------------------------------------------------------------------------------- graph rewrite
def _const(graph: onnx.GraphProto, name: str) -> np.ndarray | None:
    for t in graph.initializer:
        if t.name == name:
            return numpy_helper.to_array(t)
    for n in graph.node:
        if n.op_type == "Constant" and n.output[0] == name:
            for a in n.attribute:
                if a.name == "value":
                    return numpy_helper.to_array(a.t)
    return None


def simplify_for_mobile(path: Path) -> dict[str, int]:
    """Rewrite, in place, the ops mobile EPs lack into ops they have; returns how many of each were rewritten:
    LayerNormalization (last axis) -> ReduceMean, Sub, Pow, ReduceMean, Add, Sqrt, Div, Mul, Add (the pattern
    ORT's CPU EP fuses back into LayerNormalization); Gather of one constant index on an activation (the
    pooler's `hidden[:, 0]`) -> Slice + Squeeze."""
    from compress.onnx.runtime import atomic_onnx_path, load_model, write_proto

    model = load_model(path)
    g = model.graph
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 18)
    inits = {t.name for t in g.initializer}
    nodes: list[onnx.NodeProto] = []
    counts = {"LayerNormalization": 0, "Gather": 0}
    extra_inits: list[onnx.TensorProto] = []

    def const(name: str, value: np.ndarray) -> str:
        extra_inits.append(numpy_helper.from_array(value, name))
        return name

    for i, n in enumerate(g.node):
        if n.op_type == "LayerNormalization" and n.domain in ("", "ai.onnx"):
            axis = next((a.i for a in n.attribute if a.name == "axis"), -1)
            eps = next((a.f for a in n.attribute if a.name == "epsilon"), 1e-5)
            if axis != -1 or len(n.output) > 1 and any(n.output[1:]):
                nodes.append(n)
                continue
            p = f"edge_ln{i}"
            x, scale = n.input[0], n.input[1]
            bias = n.input[2] if len(n.input) > 2 and n.input[2] else None
            axes = const(f"{p}_axes", np.array([-1], dtype=np.int64))
            two = const(f"{p}_two", np.array(2.0, dtype=np.float32))
            e = const(f"{p}_eps", np.array(eps, dtype=np.float32))
            if opset >= 18:
                mean = helper.make_node("ReduceMean", [x, axes], [f"{p}_mean"], keepdims=1)
                var = helper.make_node("ReduceMean", [f"{p}_sq"], [f"{p}_var"], keepdims=1)
                var.input.append(axes)
            else:
                mean = helper.make_node("ReduceMean", [x], [f"{p}_mean"], axes=[-1], keepdims=1)
                var = helper.make_node("ReduceMean", [f"{p}_sq"], [f"{p}_var"], axes=[-1], keepdims=1)
            out = n.output[0]
            nodes += [
                mean,
                helper.make_node("Sub", [x, f"{p}_mean"], [f"{p}_d"]),
                helper.make_node("Pow", [f"{p}_d", two], [f"{p}_sq"]),
                var,
                helper.make_node("Add", [f"{p}_var", e], [f"{p}_vare"]),
                helper.make_node("Sqrt", [f"{p}_vare"], [f"{p}_std"]),
                helper.make_node("Div", [f"{p}_d", f"{p}_std"], [f"{p}_norm"]),
                helper.make_node("Mul", [f"{p}_norm", scale], [f"{p}_scaled" if bias else out]),
            ]
            if bias:
                nodes.append(helper.make_node("Add", [f"{p}_scaled", bias], [out]))
            counts["LayerNormalization"] += 1
            continue
        if n.op_type == "Gather" and n.input[0] not in inits:
            idx = _const(g, n.input[1])
            axis = next((a.i for a in n.attribute if a.name == "axis"), 0)
            if idx is not None and idx.ndim == 0 and int(idx) >= 0:
                p = f"edge_take{i}"
                k = int(idx)
                nodes += [
                    helper.make_node("Slice", [n.input[0], const(f"{p}_s", np.array([k], np.int64)),
                                               const(f"{p}_e", np.array([k + 1], np.int64)),
                                               const(f"{p}_a", np.array([axis], np.int64))], [f"{p}_slice"]),
                    helper.make_node("Squeeze", [f"{p}_slice", const(f"{p}_q", np.array([axis], np.int64))], [n.output[0]]),
                ]
                counts["Gather"] += 1
                continue
        nodes.append(n)
    if any(counts.values()):
        g.ClearField("node")
        g.node.extend(nodes)
        g.initializer.extend(extra_inits)
        g.ClearField("value_info")
        onnx.checker.check_model(model) if model.ByteSize() < 2_000_000_000 else None
        with atomic_onnx_path(Path(path)) as tmp:
            write_proto(model, tmp)
    log.info("edge graph %s: rewrote %s", Path(path).name, counts)
    return counts


def input_shapes(path: Path) -> dict[str, list[int | str]]:
    """The declared shape of each graph input (ints for fixed axes, names for dynamic ones)."""
    g = onnx.load(str(path), load_external_data=False).graph
    inits = {t.name for t in g.initializer}
    return {i.name: [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in i.type.tensor_type.shape.dim]
            for i in g.input if i.name not in inits}


def fixed_input_shape(path: Path) -> tuple[int, int | None] | None:
    """(batch, seq or None for images) when every input of the graph has a fixed shape, else None."""
    shapes = input_shapes(path)
    if not shapes or any(not isinstance(d, int) or d <= 0 for s in shapes.values() for d in s):
        return None
    first = next(iter(shapes.values()))
    text = [s for k, s in shapes.items() if k != "pixel_values" and len(s) == 2]
    return first[0], (text[0][1] if text else None)


# ---------------------------------------------------------------------------------------------- running
def run_fixed(session: Any, inputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Run a session on a batch of any size and length: for a graph with fixed input shapes the batch is cut into
    chunks of its batch size (the last padded with copies) and text padded (pad 0, attention 0) or cut to its
    sequence length; outputs are joined and trimmed back to the batch's rows (and, per token, its positions).
    A graph with dynamic shapes runs the batch as it is."""
    from compress.onnx.runtime import run_session

    declared = {i.name: i.shape for i in session.get_inputs()}
    dims = [d for s in declared.values() for d in s]
    if not dims or not all(isinstance(d, int) for d in dims):
        return run_session(session, inputs)
    batch = next(iter(declared.values()))[0]
    text = [s for k, s in declared.items() if k != "pixel_values" and len(s) == 2]
    seq = text[0][1] if text else None
    arrays = {k: (v.detach().cpu().numpy() if hasattr(v, "detach") else np.asarray(v)) for k, v in inputs.items()}
    rows = next(iter(arrays.values())).shape[0]
    length = arrays["input_ids"].shape[1] if "input_ids" in arrays else None
    chunks: list[dict[str, np.ndarray]] = []
    for start in range(0, rows, batch):
        part = {k: a[start:start + batch] for k, a in arrays.items()}
        n = next(iter(part.values())).shape[0]
        outs = run_session(session, fit_inputs(part, batch, seq))
        chunks.append({k: v[:n] for k, v in outs.items()})
    joined = {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}
    if seq is not None and length is not None:
        for k, v in joined.items():
            if v.ndim >= 3 and v.shape[1] == seq and length != seq:
                v = v[:, :length] if length < seq else np.pad(v, [(0, 0), (0, length - seq)] + [(0, 0)] * (v.ndim - 2))
                joined[k] = v
    return joined


def fit_batches(batches: Sequence[Mapping[str, Any]], path: Path) -> list[dict[str, np.ndarray]]:
    """Batches (calibration, fidelity checks) regrouped to the fixed shapes of the graph at `path`; the batches as
    they are when it has dynamic shapes."""
    shape = fixed_input_shape(path)
    if shape is None:
        return [dict(b) for b in batches]
    batch, seq = shape
    rows: dict[str, list[np.ndarray]] = {}
    for b in batches:
        for k, v in fit_inputs(b, len(next(iter(b.values()))), seq).items():
            rows.setdefault(k, []).append(v)
    flat = {k: np.concatenate(v) for k, v in rows.items()}
    total = next(iter(flat.values())).shape[0]
    return [fit_inputs({k: v[i:i + batch] for k, v in flat.items()}, batch, seq) for i in range(0, total, batch)]


# ---------------------------------------------------------------------------------------------- ORT format
def ort_path(onnx_path: Path) -> Path:
    return Path(onnx_path).with_suffix(".ort")


def config_path(onnx_path: Path) -> Path:
    return Path(onnx_path).with_suffix(".required_operators.config")


ORT_LEVEL_VAR = "ORT_CONVERT_ONNX_MODELS_TO_ORT_OPTIMIZATION_LEVEL"  # the converter's own switch


def write_ort(onnx_path: Path) -> tuple[Path, Path]:
    """Convert `onnx_path` with onnxruntime.tools.convert_onnx_models_to_ort into `<stem>.ort` and
    `<stem>.required_operators.config` next to it: fixed style with graph optimisation off, so the .ort holds
    exactly the graph the usability analysis saw. (Measured with ORT 1.31: its basic level already fuses the
    spelled-out LayerNorm back into LayerNormalization, which NNAPI lacks; the runtime style wrote a QDQ .ort
    that does not load: "Not enough produced nodes in the runtime optimization record".)"""
    from onnxruntime.tools.convert_onnx_models_to_ort import OptimizationStyle, convert_onnx_models_to_ort

    from compress.onnx.runtime import quiet_logs

    src = Path(onnx_path).resolve()
    dst_ort, dst_cfg = ort_path(src), config_path(src)
    with tempfile.TemporaryDirectory(prefix="compress-ort-", dir=src.parent) as td:
        work = Path(td) / "in"
        work.mkdir()
        shutil.copyfile(src, work / "model.onnx")
        for data in src.parent.glob(src.name + ".data"):
            shutil.copyfile(data, work / data.name)
        out = Path(td) / "out"
        level = os.environ.get(ORT_LEVEL_VAR)
        os.environ[ORT_LEVEL_VAR] = "disable"
        try:
            with quiet_logs(root=True), contextlib.redirect_stdout(io.StringIO()):
                convert_onnx_models_to_ort(work / "model.onnx", output_dir=out,
                                           optimization_styles=[OptimizationStyle.Fixed])
        except Exception as exc:  # noqa: BLE001 - the converter raises whatever ORT raises
            raise InputError(f"{src.name}: conversion to the ORT format failed ({str(exc).splitlines()[0][:300]})") from None
        finally:
            if level is None:
                os.environ.pop(ORT_LEVEL_VAR, None)
            else:
                os.environ[ORT_LEVEL_VAR] = level
        made = sorted(out.glob("*.ort"))
        cfgs = sorted(out.glob("*.config"))
        if not made or not cfgs:
            raise InputError(f"{src.name}: the ORT-format converter wrote no .ort file / operator config")
        shutil.copyfile(made[0], dst_ort.with_name(dst_ort.name + ".tmp"))
        shutil.copyfile(cfgs[0], dst_cfg.with_name(dst_cfg.name + ".tmp"))
    dst_ort.with_name(dst_ort.name + ".tmp").replace(dst_ort)
    dst_cfg.with_name(dst_cfg.name + ".tmp").replace(dst_cfg)
    log.info("ORT format: %s, %s", dst_ort.name, dst_cfg.name)
    return dst_ort, dst_cfg


def load_ort_session(path: Path, threads: int | None = None) -> Any:
    """A CPU session on an .ort file."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.add_session_config_entry("session.load_model_format", "ORT")
    if threads is not None:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    try:
        return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001
        raise InputError(f"{path}: ONNX Runtime cannot load the ORT-format file ({str(exc).splitlines()[0][:300]})") from None


# ---------------------------------------------------------------------------------------------- usability
def mobile_usability(path: Path, keys: Sequence[str] = tuple(ANALYSES)) -> dict[str, dict[str, Any]]:
    """ORT's mobile usability analysis of the ONNX file at `path` (onnxruntime.tools.mobile_helpers, the code
    behind check_onnx_model_mobile_usability), per EP analysis key: nodes, supported nodes, coverage, partitions
    (shapes as declared: a dynamic shape counts against NNAPI as the tool counts it), the ops the EP lacks and
    the count of nodes unsupported for dynamic shapes."""
    from onnxruntime.tools.mobile_helpers import usability_checker as uc

    model = onnx.shape_inference.infer_shapes(onnx.load(str(path)), strict_mode=False)
    tables = Path(uc.__file__).parent
    out: dict[str, dict[str, Any]] = {}
    for key in keys:
        _, table, max_rank = ANALYSES[key]
        with contextlib.redirect_stdout(io.StringIO()):
            info = uc.check_partitioning(model.graph, uc._SupportedOpsChecker(tables / table),
                                         require_fixed_input_sizes=True, max_rank=max_rank)
        out[key] = {
            "nodes": info.num_nodes,
            "supported_nodes": info.num_supported_nodes,
            "coverage": info.num_supported_nodes / info.num_nodes if info.num_nodes else 0.0,
            "partitions": info.num_partitions,
            "unsupported_ops": sorted(info.unsupported_ops),
            "unsupported_for_dynamic_shape": info.nodes_unsupported_due_to_dynamic_input,
            "suitability": info.suitability().name,
        }
    return out


def ep_gates(gates: Any, evaluation: Any, shipped: Any, fp32: Any) -> list[dict[str, Any]]:
    """Verdicts of `min_ep_coverage` / `max_ep_partitions` on the model each EP takes: the shipped QDQ int8 model
    for NNAPI, the fp32 edge model for CoreML (whose EP takes float graphs). A gate nothing measured fails."""
    out: list[dict[str, Any]] = []
    for gate, limits, better in (("min_ep_coverage", gates.min_ep_coverage, lambda v, lim: v >= lim),
                                 ("max_ep_partitions", gates.max_ep_partitions, lambda v, lim: v <= lim)):
        for name, limit in (limits or {}).items():
            key = analysis_key(name, f"gates.{gate}")
            model = shipped if TAKES_QDQ[key] else fp32
            variant = model.name if model is not None else None
            stats = evaluation.models.get(variant, {}) if evaluation is not None and variant else {}
            found = (stats.get("mobile") or {}).get(key)
            value = None if found is None else found["coverage" if gate == "min_ep_coverage" else "partitions"]
            ok = None if value is None else bool(better(value, limit))
            what = "coverage" if gate == "min_ep_coverage" else "partitions"
            detail = f"{key} {what} of {variant}: {value if value is None else round(value, 4)} vs limit {limit}"
            out.append({"name": f"{gate}.{key}", "limit": limit, "value": value, "passed": ok,
                        "detail": detail, "variant": variant})
    return out


# ---------------------------------------------------------------------------------------------- pass hooks
def ort_parity(onnx_file: Path, batches: Sequence[Mapping[str, Any]]) -> float:
    """Largest absolute difference between the outputs of the .ort file next to `onnx_file` and the .onnx itself,
    both run as stored (graph optimisation off): the conversion kept the graph. (With ORT's optimisations the
    CPU EP runs a QDQ graph with its int8 kernels, which differ from the float QDQ arithmetic by a few
    hundredths of a logit on MiniLM; evaluate reports both files' quality.)"""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 3
    a_sess = ort.InferenceSession(str(onnx_file), opts, providers=["CPUExecutionProvider"])
    b_sess = load_ort_session(ort_path(onnx_file))
    worst = 0.0
    for b in batches:
        a, o = run_fixed(a_sess, b), run_fixed(b_sess, b)
        for k in a:
            worst = max(worst, float(np.abs(a[k].astype(np.float64) - o[k].astype(np.float64)).max()))
    return worst


def run_edge_export(artifact: Any, ctx: Any, model: nn.Module, example: Mapping[str, Any],
                    check: Mapping[str, Any], cfg: Any) -> Any:
    """The export pass for an edge run: `export_edge` at the profile's shapes, parity against PyTorch computing the
    same function (tanh GELU, the prepared mask) and against the original model, then the .ort file and its
    parity to the .onnx. No transformer fusion (contrib ops have no mobile-EP kernels)."""
    from compress.artifact import ModelFile
    from compress.errors import PassFailed
    from compress.onnx.parity import check_parity
    from compress.onnx.runtime import onnx_size_mb
    from compress.tasks import get_task

    prof = profile(ctx.run)
    assert prof is not None
    eps, batch, seq = prof
    task = ctx.run.model.task
    text = get_task(task).modality != "image"
    path = ctx.out_dir / "student.onnx"
    with ctx.progress.task(f"{ctx.label}: edge export [{batch}x{seq if text else 'image'}]", total=None):
        export_edge(model, example, path, task=task, batch=batch, seq=seq if text else None, opset=cfg.opset)
    chunks = fit_batches([check], path)
    worst, worst_orig, cos = 0.0, 0.0, 1.0
    with edge_forward(model) as em:
        for c in chunks:
            feed = {k: torch.from_numpy(v) for k, v in c.items()}
            p = check_parity(em, path, feed, task=task, atol=cfg.atol, min_cosine=cfg.min_cosine)
            if not p.ok:
                raise PassFailed(ctx.label, f"edge ONNX output '{p.output}' differs from PyTorch: max abs diff "
                                 f"{p.max_abs_diff:.3g} (atol {cfg.atol}), cosine {p.cosine:.6f} (min {cfg.min_cosine})")
            worst, cos = max(worst, p.max_abs_diff), min(cos, p.cosine)
    for c in chunks:  # the original model (exact GELU, its own mask code): what the edge rewrite costs
        feed = {k: torch.from_numpy(v) for k, v in c.items()}
        worst_orig = max(worst_orig, check_parity(model, path, feed, task=task, atol=1.0, min_cosine=0.0).max_abs_diff)
    write_ort(path)
    ort_diff = ort_parity(path, chunks)
    if ort_diff > cfg.atol:
        raise PassFailed(ctx.label, f"the .ort file's output differs from the .onnx one by {ort_diff:.3g} (atol {cfg.atol})")
    ops = {n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node}
    ctx.metrics.update(parity_max_abs_diff=worst, parity_cosine=cos, original_max_abs_diff=worst_orig,
                       ort_max_abs_diff=ort_diff, fused=False, size_mb=onnx_size_mb(path), opset=cfg.opset,
                       edge_shape=[batch, seq] if text else [batch], edge_eps=eps,
                       mask_ops_left=sorted(ops & set(MASK_OPS)))
    return artifact.replace(models=[ModelFile(path, precision="fp32", method="export")], evaluation=None)


def export_qat_edge(model: nn.Module, example: Mapping[str, Any], check: Mapping[str, Any], path: Path, *,
                    task: str, batch: int, seq: int | None, opset: int = 18, atol: float = 0.05,
                    min_cosine: float = 0.999) -> dict[str, Any]:
    """The qat pass's int8 export for an edge run: the fake-quant `model` exported as `export_edge` does (fixed
    shapes, the prepared additive mask, eager attention, tanh GELU), its weights folded to int8 initializers
    with one consumer per QuantizeLinear (`compress.quant.export.place_qdq`), then `simplify_for_mobile`; parity of
    ORT's int8 output against the fake-quant model computing the same function, and the .ort file. No fusion.
    Returns metrics (`parity_ok` False: the caller fails the pass)."""
    from compress.onnx.export import export_onnx
    from compress.onnx.parity import check_parity
    from compress.onnx.runtime import atomic_onnx_path, load_model, write_proto
    from compress.quant.export import place_qdq
    from compress.quant.fake import export_mode

    path = Path(path)
    inputs = {k: torch.from_numpy(v) for k, v in fit_inputs(example, batch, seq).items()}
    with tempfile.TemporaryDirectory(prefix="compress-qat-edge-", dir=path.parent) as td:
        raw = Path(td) / "raw.onnx"
        with export_mode(model), edge_forward(model) as em:
            export_onnx(em, inputs, raw, task=task, opset=opset, dynamic=False)
        proto = load_model(raw)
        changes = place_qdq(proto)
        with atomic_onnx_path(path) as tmp:
            write_proto(proto, tmp)
    rewrites = simplify_for_mobile(path)
    left = sorted({n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node} & set(MASK_OPS))
    if left:
        raise InputError(f"qat: the edge graph of {type(model).__name__} still holds {', '.join(left)}; see docs/edge.md")
    chunks = fit_batches([check], path)
    worst, cos, ok, output = 0.0, 1.0, True, ""
    with edge_forward(model) as em:
        for c in chunks:
            p = check_parity(em, path, {k: torch.from_numpy(v) for k, v in c.items()}, task=task, atol=atol,
                             min_cosine=min_cosine)
            worst, cos = max(worst, p.max_abs_diff), min(cos, p.cosine)
            ok, output = ok and p.ok, output or ("" if p.ok else p.output)
    write_ort(path)
    return {"parity_ok": ok, "parity_output": output, "parity_max_abs_diff": worst, "parity_cosine": cos,
            "ort_max_abs_diff": ort_parity(path, chunks), "rewrites": rewrites, **changes}


def finish_quantized(path: Path, batches: Sequence[Mapping[str, Any]], atol: float = 1e-3) -> dict[str, Any]:
    """After ptq / qat on an edge graph: the quantizer's pre-processing (ORT's basic level) fuses LayerNorm back,
    so spell it out again; then the .ort file and its parity to the .onnx. Returns metrics."""
    counts = simplify_for_mobile(path)
    write_ort(path)
    diff = ort_parity(path, batches[:4])
    if diff > atol:
        raise InputError(f"{Path(path).name}: the .ort file's output differs from the .onnx one by {diff:.3g}")
    return {"rewrites": counts, "ort_max_abs_diff": diff}


def sidecars(model_path: Path, out_name: str) -> list[tuple[Path, str]]:
    """The files that go out with an edge model (`student.int8-static.onnx` -> `student.int8-static.ort`,
    `student.int8-static.required_operators.config`): (source, name in the output folder)."""
    stem = out_name[: -len(".onnx")] if out_name.endswith(".onnx") else out_name
    pairs = [(ort_path(model_path), f"{stem}.ort"), (config_path(model_path), f"{stem}.required_operators.config")]
    return [(src, name) for src, name in pairs if src.is_file()]


def evaluate_ort(model_path: Path, batches: Sequence[Mapping[str, Any]], onnx_outs: Sequence[Any],
                 score: Any, metric: str, threads: int | None = None) -> dict[str, Any] | None:
    """Quality of the .ort file next to `model_path` on the eval batches, and its largest difference to the .onnx
    outputs as evaluate ran them (ORT's full optimisation: int8 kernels for a QDQ graph, whereas the .ort runs as
    stored); None when there is no .ort file. `score(s_out) -> scores`."""
    o = ort_path(model_path)
    if not o.is_file():
        return None
    sess = load_ort_session(o, threads=threads)
    outs = [torch.from_numpy(next(iter(run_fixed(sess, b).values()))) for b in batches]
    diff = max((float((a.double() - b.double()).abs().max()) for a, b in zip(outs, onnx_outs)), default=0.0)
    scores = score(outs)
    return {"file": o.name, "quality": scores[metric], "max_abs_diff_to_onnx": diff}


def fixed_latency_inputs(path: Path, inputs: Mapping[str, Any]) -> Mapping[str, Any]:
    """Latency inputs cut or padded to the fixed shapes of the graph at `path` (the inputs as they are otherwise)."""
    shape = fixed_input_shape(path)
    return inputs if shape is None else fit_inputs(inputs, shape[0], shape[1])


def edge_stats(model_path: Path, batches: Sequence[Mapping[str, Any]], onnx_outs: Sequence[Any], score: Any,
               metric: str, threads: int | None = None) -> dict[str, Any]:
    """What `evaluate` adds for an edge run: `mobile` (ORT's usability analysis per EP), `fixed_shape`, and
    `ort_format` (the .ort file's quality and its largest difference to the .onnx outputs)."""
    out: dict[str, Any] = {"mobile": mobile_usability(model_path), "fixed_shape": fixed_input_shape(model_path) is not None}
    ort_stats = evaluate_ort(model_path, batches, onnx_outs, score, metric, threads)
    if ort_stats is not None:
        out["ort_format"] = ort_stats
    return out
