"""The teacher in ONNX Runtime: the baselines a user would otherwise ship, made with the same export, fusion and
quantization code as the student (compress.onnx.export, compress.onnx.quantize).

- `fp32`: the teacher exported and, for the families ORT's transformer optimizer knows (FUSION_MODEL_TYPES),
  fused (attention / LayerNorm / GELU): the fastest fp32 graph a user gets, not a straw man;
- `dynamic`: ORT dynamic int8 of that optimized graph (what `optimum-cli onnxruntime quantize` or Olive give
  in one command);
- `static`: ORT static int8 (QDQ, U8S8: uint8 activations, int8 per-channel weights), calibrated on the batches
  given, also from the optimized graph.

The evaluate pass measures these next to the students (report rows and ratios); benchmarks/pipeline.py uses the
same function. Files: `teacher.onnx`, `teacher.int8-dynamic.onnx`, `teacher.int8-static.onnx` in `out_dir`."""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compress.artifact import ModelFile
from compress.errors import InputError, PassFailed

log = logging.getLogger(__name__)

BASELINE_METHODS = ("fp32", "dynamic", "static")
# tasks whose teacher a single-output ONNX graph serves as the student's does (no KV cache)
BASELINE_TASKS = ("sequence-classification", "token-classification", "feature-extraction", "image-classification")


@dataclass(frozen=True)
class TeacherModel(ModelFile):
    """A teacher baseline file: a ModelFile (precision, method, `name` = fp32 / int8-dynamic / int8-static) plus
    whether ORT's transformer optimizer fused the graph it was made from."""

    fused: bool = False

    @property
    def label(self) -> str:
        """How reports name the row: `teacher fp32 (ORT, fused)`, `teacher int8-dynamic (ORT)`."""
        return f"teacher {self.name} (ORT{', fused' if self.fused and self.method == 'export' else ''})"


def why_not(task: str, *, edge: bool = False, cache: bool = False) -> str | None:
    """None when teacher baselines apply to a run, else the reason they are skipped (logged by the caller)."""
    if cache or task == "causal-lm":
        return "teacher baselines: skipped for causal-lm decoders (the KV-cache decoder is timed per token, not as one graph)"
    if task not in BASELINE_TASKS:
        return f"teacher baselines: skipped for task {task}"
    if edge:
        return "teacher baselines: skipped on an edge target (fixed-shape mobile graphs; the baselines are desktop graphs)"
    return None


def teacher_baselines(
    teacher_dir: Path | str | None,
    task: str,
    out_dir: Path | str,
    target: Any = None,
    *,
    methods: Sequence[str] = ("fp32", "dynamic"),
    calibration: Sequence[Mapping[str, Any]] | None = None,
    model: Any = None,
    example_inputs: Mapping[str, Any] | None = None,
    exporter: str = "dynamo",
    optimize: bool = True,
    opset: int = 18,
    output_name: str | None = None,
    atol: float = 1e-3,
    min_cosine: float = 0.9999,
) -> list[TeacherModel]:
    """Export the teacher at `teacher_dir` (or the loaded `model`, an nn.Module taking the task's inputs) to ONNX in
    `out_dir`, fuse it where the family is fusable, and quantize the fused graph. Returns one TeacherModel per
    method, in BASELINE_METHODS order: `fp32` (always made: the others start from it), `dynamic`, `static` (needs
    `calibration`, batches of input arrays or tensors). `target` (compress.config.Target, optional) only sets the
    threads of the parity check. The fused graph is kept only when it matches PyTorch (`atol`, `min_cosine`) on
    `example_inputs` (default: synthetic inputs of the model's shape); otherwise the unfused export is used.
    `exporter="legacy"` (TorchScript) lets the optimizer fuse whole attention blocks on BERT-like models."""
    import torch

    from compress.onnx.export import FUSION_MODEL_TYPES, export_onnx, optimize_onnx
    from compress.onnx.parity import check_parity
    from compress.onnx.quantize import quantize_dynamic_int8, quantize_static_qdq
    from compress.tasks import get_task

    unknown = [m for m in methods if m not in BASELINE_METHODS]
    if unknown:
        raise InputError(f"teacher baselines: methods {unknown} unknown; choose from {', '.join(BASELINE_METHODS)}")
    if "static" in methods and not calibration:
        raise InputError("teacher baselines: static int8 needs calibration batches (data.calibration or data.train)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if model is None:
        if teacher_dir is None:
            raise InputError("teacher baselines: no teacher (teacher_dir is None and no model given)")
        from compress.models.loading import load_model

        model = load_model(str(teacher_dir), task)
    model = model.eval()
    spec = get_task(task)
    config = getattr(model, "config", None)
    if example_inputs is None:
        example_inputs = spec.synthetic_inputs(config, batch_size=2, seq_len=16)
    example = {k: torch.as_tensor(v) for k, v in example_inputs.items()}
    threads = getattr(target, "threads", None)

    raw, fp32 = out / "teacher.raw.onnx", out / "teacher.onnx"
    export_onnx(model, example, raw, task=task, opset=opset, exporter=exporter, output_name=output_name)
    fused = False
    mtype = FUSION_MODEL_TYPES.get(getattr(config, "model_type", ""))
    if optimize and mtype:
        # from the config: `model` may wrap the HF model (a sentence encoder); 0 lets the optimizer read the shapes
        heads, hidden = int(getattr(config, "num_attention_heads", 0) or 0), int(getattr(config, "hidden_size", 0) or 0)
        if optimize_onnx(raw, fp32, model_type=mtype, num_heads=heads, hidden_size=hidden):
            parity = check_parity(model, fp32, example, task=task, atol=atol, min_cosine=min_cosine, threads=threads)
            fused = parity.ok
            if not fused:
                log.info("teacher baselines: the fused teacher differs from PyTorch (max abs diff %.3g, cosine %.6f); "
                         "using the unfused export", parity.max_abs_diff, parity.cosine)
    if fused:
        raw.unlink()
    else:
        fp32.unlink(missing_ok=True)
        raw.replace(fp32)
        parity = check_parity(model, fp32, example, task=task, atol=atol, min_cosine=min_cosine, threads=threads)
        if not parity.ok:
            raise PassFailed("teacher baselines", f"the teacher's ONNX graph differs from PyTorch: max abs diff "
                             f"{parity.max_abs_diff:.3g}, cosine {parity.cosine:.6f}")
    made = [TeacherModel(fp32, precision="fp32", method="export", fused=fused)]
    if "dynamic" in methods:
        dst = quantize_dynamic_int8(fp32, out / "teacher.int8-dynamic.onnx")
        made.append(TeacherModel(dst, precision="int8", method="dynamic", fused=fused))
    if "static" in methods:
        assert calibration is not None
        dst = quantize_static_qdq(fp32, out / "teacher.int8-static.onnx", list(calibration), per_channel=True,
                                  activations="uint8")
        made.append(TeacherModel(dst, precision="int8", method="static", fused=fused))
    log.info("teacher baselines in %s: %s (fused: %s)", out, ", ".join(m.name for m in made), fused)
    return made


def as_model_file(m: TeacherModel) -> ModelFile:
    """The plain ModelFile of a baseline (e.g. to store in an artifact)."""
    return ModelFile(**{f.name: getattr(m, f.name) for f in dataclasses.fields(ModelFile)})
