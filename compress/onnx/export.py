"""PyTorch -> ONNX with the dynamo exporter (torch.export + onnxscript), one task output per graph, dynamic
batch (and sequence) axes; ORT transformer fusion as an optional second step."""
from __future__ import annotations

import collections
import inspect
import logging
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import onnx
import torch
from torch import nn

from compress.errors import CompressError, InputError
from compress.onnx.runtime import atomic_onnx_path, load_model, make_session, quiet_logs, write_proto
from compress.tasks import get_task

log = logging.getLogger(__name__)

# the graph inputs export_onnx knows how to name; anything else in example_inputs is an error
EXPORT_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids", "pixel_values")
# loggers whose INFO/WARNING chatter (e.g. "torchvision is not installed", every pass of the graph optimizer)
# is silenced during one export / fusion; errors still show
# model_type -> the model type ORT's transformer optimizer fuses it as (export and qat fuse only these)
FUSION_MODEL_TYPES = {"bert": "bert", "roberta": "bert", "distilbert": "bert", "vit": "vit", "gpt2": "gpt2"}
EXPORTER_LOGGERS = ("torch.onnx", "torch.export", "torch._export", "onnxscript", "onnx_ir")
FUSION_LOGGERS = ("onnxruntime.transformers", "fusion_base", "onnx_model", "onnx_model_bert", "onnx_model_gpt2",
                  "onnx_model_vit", "fusion_utils", "fusion_attention", "fusion_skiplayernorm", "fusion_layernorm",
                  "fusion_gelu", "fusion_options", "optimizer")


class OnnxExportError(CompressError):
    """torch.onnx.export could not turn the model into an ONNX graph (exit code 1: not the user's input)."""

    exit_code = 1


def select_output(out: Any, task: str) -> torch.Tensor:
    """The task's output tensor from whatever a model returns (HF ModelOutput, dict, tuple or a tensor)."""
    key = get_task(task).output
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, Mapping):
        if key in out and out[key] is not None:
            return out[key]
        raise OnnxExportError(f"the model's output has no '{key}' (it has: {', '.join(out.keys())}); is task '{task}' right?")
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise OnnxExportError(f"cannot find the '{key}' tensor in a model output of type {type(out).__name__}")


def _accepts(model: nn.Module, name: str) -> bool:
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def forward_kwargs(model: nn.Module, task: str) -> dict[str, Any]:
    """Extra keyword arguments for the model's forward: no KV cache for causal LMs."""
    return {"use_cache": False} if task == "causal-lm" and _accepts(model, "use_cache") else {}


class TaskOutputModule(nn.Module):
    """Wraps a model so that forward takes named tensors and returns only the task output tensor."""

    def __init__(self, model: nn.Module, task: str):
        super().__init__()
        self.model = model
        self.task = task
        self.extra = forward_kwargs(model, task)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
    ) -> torch.Tensor:
        given = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids,
                 "position_ids": position_ids, "pixel_values": pixel_values}
        kwargs = {k: v for k, v in given.items() if v is not None}
        return select_output(self.model(**kwargs, **self.extra), self.task)


def accepted_inputs(model: nn.Module, names: list[str]) -> list[str]:
    """Which of `names` the model's forward takes. When forward names some of EXPORT_INPUTS explicitly, inputs
    it does not name are dropped (a BERT tokenizer's token_type_ids given to DistilBERT); a forward that takes
    only **kwargs keeps them all."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return list(names)
    explicit = {n for n, p in params.items() if p.kind not in (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)}
    if not explicit & set(EXPORT_INPUTS):
        return list(names)
    return [n for n in names if n in explicit]


def _max_positions(model: nn.Module) -> int | None:
    cfg = getattr(model, "config", None)
    for attr in ("max_position_embeddings", "n_positions", "max_seq_len"):
        value = getattr(cfg, attr, None)
        if isinstance(value, int) and value > 2:
            return value
    return None


def _dynamic_shapes(model: nn.Module, inputs: Mapping[str, torch.Tensor], task: str) -> dict[str, dict[int, Any]]:
    batch = torch.export.Dim("batch")
    shapes: dict[str, dict[int, Any]] = {}
    if get_task(task).modality == "image":
        return {name: {0: batch} for name in inputs}
    max_len = _max_positions(model)
    seq = torch.export.Dim("sequence", max=max_len) if max_len else torch.export.Dim("sequence")
    for name, t in inputs.items():
        shapes[name] = {0: batch, 1: seq} if t.dim() >= 2 else {0: batch}
    return shapes


def _model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def export_onnx(
    model: nn.Module,
    example_inputs: dict[str, torch.Tensor],
    path: Path,
    *,
    task: str,
    opset: int = 18,
    dynamic: bool = True,
    optimize: bool = True,
    strip_metadata: bool = True,
    exporter: str = "dynamo",
    output_name: str | None = None,
) -> Path:
    """Export `model` to ONNX at `path` (written atomically) and return the path.

    The graph's inputs are the keys of `example_inputs` (any of EXPORT_INPUTS), its single output is the
    task output named as the task table says (compress.tasks) (causal LMs without a KV cache). With `dynamic`, axis 0 is a dynamic
    `batch` axis and, for text, axis 1 a dynamic `sequence` axis. The model is exported in eval mode and
    left in the mode it was in. `optimize` runs onnxscript's graph optimizer (constant folding, cleanup).
    `strip_metadata` drops the exporter's per-node debug metadata (stack traces, module paths: ~2.5 kB a node).
    `exporter="legacy"`: TorchScript export (`dynamo=False`) of the eager attention path, the graph on which
    ORT's transformer optimizer fuses whole attention blocks (`Attention`, `EmbedLayerNormalization`); on dynamo
    graphs it fuses only LayerNorm / SkipLayerNorm / BiasGelu. `output_name` names the output instead of the task
    table (a model that returns one tensor, e.g. compress.embed's `sentence_embedding`)."""
    if exporter not in ("dynamo", "legacy"):
        raise InputError(f"export.exporter: '{exporter}' is not dynamo or legacy")
    out_name = output_name or get_task(task).output
    path = Path(path)
    if not example_inputs:
        raise InputError("export: example_inputs is empty; give at least input_ids (text) or pixel_values (vision)")
    unknown = [k for k in example_inputs if k not in EXPORT_INPUTS]
    if unknown:
        raise InputError(f"export: unsupported input(s) {', '.join(unknown)}; the exporter takes {', '.join(EXPORT_INPUTS)}")
    keep = accepted_inputs(model, list(example_inputs))
    if len(keep) < len(example_inputs):
        log.info("export: %s does not take %s; left out of the graph", type(model).__name__,
                 ", ".join(k for k in example_inputs if k not in keep))
    if not keep:
        raise InputError(f"export: {type(model).__name__}.forward takes none of the inputs given ({', '.join(example_inputs)})")
    device = _model_device(model)
    inputs = {k: torch.as_tensor(example_inputs[k]).to(device) for k in keep}
    wrapper = TaskOutputModule(model, task)
    shapes = _dynamic_shapes(model, inputs, task) if dynamic else None
    was_training = model.training
    model.eval()
    wrapper.eval()
    if exporter == "legacy":
        try:
            return _export_legacy(model, wrapper, inputs, path, opset=opset, dynamic=dynamic, task=task,
                                  out_name=out_name)
        finally:
            model.train(was_training)
    try:
        with warnings.catch_warnings(), quiet_logs(*EXPORTER_LOGGERS):
            warnings.simplefilter("ignore")
            with torch.no_grad():
                program = torch.onnx.export(
                    wrapper, (), kwargs=inputs, dynamo=True, opset_version=opset, dynamic_shapes=shapes,
                    output_names=[out_name], optimize=optimize, verbose=False, report=False,
                )
    except Exception as exc:  # noqa: BLE001 - torch raises many types; we name the model and the first line
        raise OnnxExportError(
            f"torch.onnx.export failed for {type(model).__name__} (task {task}, opset {opset}): {_summary(exc)}"
        ) from exc
    finally:
        model.train(was_training)
    if program is None:  # only for the legacy exporter; dynamo=True always returns a program
        raise OnnxExportError(f"torch.onnx.export returned no program for {type(model).__name__}")
    if strip_metadata:
        _strip_node_metadata(program)
    with atomic_onnx_path(path) as tmp:
        program.save(tmp)  # one file under 2 GB, else weights in <name>.data next to it
    proto = load_model_header(path)
    got = {i.name for i in proto.graph.input}
    if got != set(inputs):
        log.warning("exported graph inputs %s differ from the example inputs %s", sorted(got), sorted(inputs))
    log.info("exported %s (%s) to %s: %d nodes, opset %d", type(model).__name__, task, path, len(proto.graph.node), opset)
    return path


class _Positional(nn.Module):
    """The TorchScript exporter passes inputs by position: this maps them back to names."""

    def __init__(self, inner: nn.Module, names: list[str]):
        super().__init__()
        self.inner, self.names = inner, names

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        return self.inner(**dict(zip(self.names, tensors)))


def _export_legacy(model: nn.Module, wrapper: nn.Module, inputs: dict[str, torch.Tensor], path: Path, *,
                   opset: int, dynamic: bool, task: str, out_name: str) -> Path:
    """`export_onnx` with the TorchScript exporter, through the eager attention path (restored afterwards)."""
    from compress.models.base import _restore_attn_implementation, _set_attn_implementation

    names = list(inputs)
    axes: dict[str, dict[int, str]] | None = None
    if dynamic:
        axes = {n: ({0: "batch", 1: "sequence"} if t.dim() >= 2 and get_task(task).modality != "image" else {0: "batch"})
                for n, t in inputs.items()}
        per_token = get_task(task).labels in ("token-class", "next-token") or (
            task == "feature-extraction" and out_name == get_task(task).output)
        axes[out_name] = {0: "batch", 1: "sequence"} if per_token else {0: "batch"}
    saved = _set_attn_implementation(model, "eager")
    try:
        with warnings.catch_warnings(), quiet_logs(*EXPORTER_LOGGERS), atomic_onnx_path(path) as tmp:
            warnings.simplefilter("ignore")
            with torch.no_grad():
                torch.onnx.export(_Positional(wrapper, names), tuple(inputs.values()), str(tmp), dynamo=False,
                                  opset_version=opset, input_names=names, output_names=[out_name],
                                  dynamic_axes=axes)
    except Exception as exc:  # noqa: BLE001 - as for the dynamo exporter
        raise OnnxExportError(f"torch.onnx.export (legacy) failed for {type(model).__name__} (task {task}, "
                              f"opset {opset}): {_summary(exc)}") from exc
    finally:
        if saved is not None:
            _restore_attn_implementation(model, saved)
    log.info("exported %s (%s, legacy exporter) to %s", type(model).__name__, task, path)
    return path


def _strip_node_metadata(program: Any) -> None:
    graph = program.model.graph
    nodes = graph.all_nodes() if hasattr(graph, "all_nodes") else list(graph)
    for node in nodes:
        node.metadata_props.clear()


def load_model_header(path: Path) -> onnx.ModelProto:
    """The graph structure of an ONNX file without its external weights."""
    return onnx.load(str(path), load_external_data=False)


def _summary(exc: BaseException) -> str:
    """The most telling line of an exporter error (torch's messages run to pages)."""
    for e in (exc.__cause__, exc):
        if e is None:
            continue
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        for ln in lines:
            if not ln.startswith(("Failed to export", "[", "-", "The error above", "For more information")):
                return f"{type(e).__name__}: {ln[:500]}"
    return type(exc).__name__


def op_counts(path: Path) -> dict[str, int]:
    """How many nodes of each op type the top-level graph of an ONNX file has."""
    return dict(collections.Counter(n.op_type for n in load_model_header(path).graph.node))


def optimize_onnx(src: Path, dst: Path, *, model_type: str, num_heads: int, hidden_size: int) -> bool:
    """Fuse attention / LayerNorm / GELU patterns with onnxruntime.transformers.optimizer (opt_level 0:
    pattern fusion only, so the result stays portable across execution providers).

    Returns True and writes `dst` (atomically) when at least one fusion applied and the fused model loads in
    ONNX Runtime; returns False and writes nothing when the model type is unknown, nothing fused, or the
    optimizer failed. Parity is the caller's to check."""
    from onnxruntime.transformers import optimizer

    src, dst = Path(src), Path(dst)
    if model_type not in optimizer.MODEL_TYPES:
        log.info("fusion skipped: model_type '%s' is not one onnxruntime.transformers.optimizer knows", model_type)
        return False
    proto = load_model(src)
    before = sum(1 for _ in proto.graph.node)
    try:
        with warnings.catch_warnings(), quiet_logs(*FUSION_LOGGERS):
            warnings.simplefilter("ignore")
            opt = optimizer.optimize_model(proto, model_type=model_type, num_heads=num_heads, hidden_size=hidden_size,
                                           opt_level=0, use_gpu=False)
            fused = {k: v for k, v in opt.get_fused_operator_statistics().items() if v}
    except Exception as exc:  # noqa: BLE001 - the optimizer's pattern matchers fail in many ways on unusual graphs
        log.info("fusion (%s) failed on %s: %s", model_type, src.name, _summary(exc))
        return False
    # LayerNormalization is counted even when the graph already had it (opset >= 17): not a fusion by itself
    real = {k: v for k, v in fused.items() if k not in ("LayerNormalization", "SimplifiedLayerNormalization")}
    if not real:
        log.info("fusion (%s) found nothing to fuse in %s", model_type, src.name)
        return False
    model = opt.model
    model.graph.ClearField("value_info")  # stale shapes from before fusion
    domains = {n.domain for n in model.graph.node if n.domain}
    declared = {o.domain for o in model.opset_import}
    for domain in sorted(domains - declared):  # fused contrib ops need their domain declared (quantizers check)
        model.opset_import.add(domain=domain, version=1)
    try:
        with atomic_onnx_path(dst) as tmp:
            write_proto(model, tmp)
            make_session(tmp)  # a fused graph ORT cannot load is no use
    except InputError as exc:
        log.info("fused model does not load in ONNX Runtime (%s); keeping the unfused one", exc)
        return False
    log.info("fused %s (%s): %s; %d -> %d nodes", src.name, model_type, fused, before, len(model.graph.node))
    return True
