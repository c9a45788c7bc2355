"""qat: quantization-aware training with distillation (Kim et al. 2022), exported as an int8 QDQ ONNX model
that ONNX Runtime runs on integer kernels.

Fake quantization (compress.quant.fake) goes into every Linear the model adapter knows (and, by default, the
pooler / classifier and the embedding tables): int8 per-channel symmetric weights (7-bit with `reduce_range`,
4-bit or ternary as options), uint8 per-tensor activations on each Linear's input, straight-through estimator.
Min-max observers are calibrated on data.calibration before training; with `lsq` the activation scales are
trained (LSQ, their own parameter group). The loss is the distillation objective (compress.distill.objective:
logit KL, hidden MSE, attention-map KL, attention-output MSE, weights from `weights`) against the teacher or,
with `teacher: student`, against the fp32 student itself; the loop is the shared trainer.

Then the export (compress.quant.export): int8 initializers + DequantizeLinear for every weight (no float weight
left), one uint8 Q/DQ pair per MatMul input; parity of ORT's int8 output against the fake-quant PyTorch model
is checked like the export pass's (a mismatch fails the pass), and the graph is recorded as the shipped
`int8-qat` model, which `evaluate` scores."""
from __future__ import annotations

import copy
import json
import logging
from typing import Any, Literal

import torch
from pydantic import Field

from compress.artifact import Artifact, ModelFile
from compress.contracts import Kind
from compress.distill.objective import LossWeights, ObjectiveConfig
from compress.distill.teacher import TeacherConfig
from compress.errors import PassFailed
from compress.passes.base import Pass, PassContext
from compress.passes.common import model_inputs, task_batches, train_seed
from compress.registry import register
from compress.train.trainer import ParamGroup, StepOutput, TrainConfig

log = logging.getLogger(__name__)

__all__ = ["QAT", "QATConfig"]


def _qat_weights() -> LossWeights:  # KD for QAT: logits, hidden states, attention maps, attention outputs
    return LossWeights(logit=1.0, ce=0.0, hidden=1.0, attention=1.0, attention_output=1.0)


class QATConfig(ObjectiveConfig, TeacherConfig, TrainConfig):
    """The trainer's settings, the teacher's, the objective's (KD for QAT) plus these."""

    teacher: Literal["teacher", "student"] = Field(
        "teacher", description="Who teaches: the full-precision teacher, or the fp32 student itself (a copy made "
        "before fake quantization; the layer map is then the identity).")
    weight_bits: int = Field(8, description="Weight bits: 8, 7 (reduce range), 4 or 2 (ternary); stored as int8.")
    activation_bits: int = Field(8, description="Activation bits: 8 (uint8 with zero point, U8S8) is what the export holds.")
    reduce_range: bool | Literal["auto"] = Field(
        "auto", description="7-bit weights and activations in (0, 127): for x86 CPUs without VNNI (before Cascade "
        "Lake / Zen 4), where u8s8 int8 multiplies add pairs in int16 and can saturate. auto: on when the CPU "
        "running the pass lacks VNNI (part of the cache key; the metric reduce_range says what was used).")
    quantize_activations: bool = Field(True, description="Fake-quantize the input of every Linear (static uint8); False: weight-only QAT.")
    quantize_head: bool = Field(True, description="Also quantize the Linear layers outside the transformer layers (pooler, classifier).")
    quantize_embeddings: bool = Field(True, description="Also store the embedding tables as int8 (per row).")
    quantize_qk: bool = Field(
        False, description="Also fake-quantize Q and K^T, the inputs of attention's score MatMul (uint8 per tensor; "
        "ORT then runs QK^T on an integer kernel). Needs data.calibration.")
    quantize_attention_probs: bool = Field(
        False, description="Also fake-quantize the attention probabilities and V, the inputs of the context MatMul "
        "(ORT runs P x V as QLinearMatMul). Needs data.calibration.")
    dropout: bool = Field(
        False, description="Keep the model's dropout while training. Off by default: QAT nudges a trained model "
        "towards its quantized self, and the attention maps the KD terms compare are taken after dropout (dropped "
        "probabilities are 0 and blow up the attention KL).")
    lsq: bool = Field(False, description="Learnable activation scales (LSQ), exported as plain Q/DQ.")
    lsq_lr: float | None = Field(None, gt=0, description="Learning rate of the LSQ scales (default: lr).")
    calibration_examples: int = Field(128, gt=0, description="Examples of data.calibration for the min-max observers.")
    max_length: int | None = Field(None, gt=0, description="Max tokens per example (default: model.max_length).")
    opset: int = Field(18, ge=14, description="ONNX opset of the int8 export.")
    atol: float = Field(0.05, gt=0, description="Largest allowed absolute difference, ORT int8 vs the fake-quant PyTorch model.")
    min_cosine: float = Field(0.999, gt=0, le=1, description="Smallest allowed cosine similarity, ORT int8 vs fake-quant PyTorch.")
    parity_examples: int = Field(8, gt=0, description="Real examples used for the parity check.")
    optimize: bool = Field(True, description="Fuse LayerNorm / SkipLayerNorm / BiasGelu in the int8 graph with ORT's "
                           "transformer optimizer (kept only if parity holds).")
    nproc: int | None = Field(None, gt=0, description="Training processes (torchrun); default: `compress run --nproc`, else 1.")
    weights: LossWeights = Field(default_factory=_qat_weights, description="Weight of each loss term (KD for QAT: logit, hidden, attention, attention_output).")

    def quant_spec(self) -> Any:
        from compress.quant.fake import QuantSpec

        return QuantSpec(weight_bits=self.weight_bits, activation_bits=self.activation_bits,
                         reduce_range=None if self.reduce_range == "auto" else self.reduce_range, lsq=self.lsq,
                         quantize_activations=self.quantize_activations,
                         head=self.quantize_head, embeddings=self.quantize_embeddings,
                         attention_qk=self.quantize_qk, attention_probs=self.quantize_attention_probs)


@register
class QAT(Pass):
    """Quantization-aware training with distillation; int8 QDQ ONNX export with parity."""

    type = "qat"
    Config = QATConfig
    version = "7"  # 7: reduce_range auto (on without VNNI); 6: earlier PTQ models stay in the artifact (unshipped) for evaluate; 5: a trimmed vocabulary's id map goes on with the student (evaluate read the teacher through the trimmed tokenizer); 2: pooler/classifier Gemm biases split off (QGemm), the int8 graph fused by ORT's optimizer; 3: attention quantization options; 4: int8 embedding lookups export as Gather (was GatherND), edge targets
    uses_data = ("train", "calibration", "eval")
    uses_edge = True  # target.edge: the edge graph (fixed shapes, no fusion) and its .ort (pipeline cache key)
    consumes = (Kind.TORCH_STUDENT, Kind.TEACHER)
    produces = (Kind.ONNX, Kind.ONNX_QUANTIZED)
    drops = (Kind.EVALUATION,)

    def validate(self, run: Any) -> str | None:
        from compress.errors import InputError

        cfg: QATConfig = self.config  # type: ignore[assignment]
        try:
            cfg.quant_spec().check(where="qat")
        except InputError as exc:
            return str(exc).removeprefix("qat.")
        if run.data.train is None:
            return "qat needs data.train"
        needs = [f for f in ("quantize_activations", "quantize_qk", "quantize_attention_probs") if getattr(cfg, f)]
        if needs and run.data.calibration is None:
            return (f"{needs[0]}: the activation observers are calibrated on data.calibration, which is "
                    f"missing; add data.calibration (or set {needs[0]}: false)")
        return None

    def reads_from_run(self, run: Any) -> Any:
        from compress.onnx.cpu import reduce_range_key

        return reduce_range_key(self.config.reduce_range)  # type: ignore[attr-defined]

    def run(self, artifact: Artifact, ctx: PassContext) -> Artifact:
        from compress.train.launch import run_training

        return run_training(self, artifact, ctx, self.config.nproc)  # type: ignore[attr-defined]

    def train(self, artifact: Artifact, ctx: PassContext) -> Artifact:
        from compress.distill.objective import DistillObjective
        from compress.distill.teacher import prepare_teacher
        from compress.quant import fake
        from compress.train.distributed import is_main_process
        from compress.train.trainer import Trainer

        cfg: QATConfig = self.config  # type: ignore[assignment]
        seed = train_seed(cfg, ctx)
        torch.manual_seed(seed)
        student = ctx.load_student(artifact)
        if cfg.teacher == "student":
            teacher = copy.deepcopy(student)
        else:
            teacher = ctx.load_teacher(artifact)
        names = fake.insert_fake_quant(student, cfg.quant_spec())
        if not cfg.dropout:
            for m in student.modules():
                if isinstance(m, torch.nn.Dropout):
                    m.p = 0.0  # HF attention reads its dropout module's p
        teacher = prepare_teacher(teacher, cfg)
        teacher.to(ctx.device)
        student.to(ctx.device)
        pre = ctx.load_preprocessor(artifact)
        max_length = cfg.max_length

        calibrated = 0
        if cfg.quantize_activations or cfg.quantize_qk or cfg.quantize_attention_probs:
            calib = (({k: v.to(ctx.device) for k, v in model_inputs(b).items()})
                     for b in task_batches(ctx, "calibration", pre, batch_size=cfg.batch_size,
                                           limit=cfg.calibration_examples, max_length=max_length, model=teacher))
            calibrated = fake.calibrate(student, calib)
        student.train()
        from compress.prune.idmap import load_id_map

        # a vocabulary-trimmed student: the full teacher reads the original ids (the fp32 student copy needs none)
        id_map = load_id_map(artifact.model_dir) if cfg.teacher == "teacher" else None
        objective = DistillObjective(student, teacher, cfg, task=ctx.run.model.task, where=f"passes: '{ctx.label}'",
                                     teacher_id_map=id_map)

        def loss_fn(model: torch.nn.Module, batch: dict[str, torch.Tensor], step: int) -> StepOutput:
            out = objective(batch, model=model)
            return StepOutput(loss=out.total, terms=out.floats())

        def batches(epoch: int) -> Any:
            return task_batches(ctx, "train", pre, batch_size=cfg.batch_size, shuffle=True, seed=seed + epoch,
                                max_length=max_length, model=teacher)

        groups = []
        scales = fake.lsq_scales(student)
        if scales:
            groups.append(ParamGroup("lsq_scales", scales, lr=cfg.lsq_lr))
        trainer = Trainer(student, TrainConfig.subset(cfg, seed=seed), loss_fn=loss_fn, train_batches=batches,
                          checkpoint_dir=ctx.work_dir / "ckpt", extra_modules=objective.modules(),
                          param_groups=groups, progress=ctx.progress, label=ctx.label)
        result = trainer.train()
        ctx.metrics.update(
            steps=result["steps"], final_loss=result["final_loss"], loss_curve=result["loss_curve"],
            term_curves=result["term_curves"], train_device=result["device"], resumed_from=result.get("resumed_from"),
            quantized_modules=len(names), calibration_batches=calibrated, teacher_source=cfg.teacher,
            weight_bits=cfg.weight_bits, reduce_range=cfg.quant_spec().reduce_range, lsq=cfg.lsq,
        )
        if not is_main_process():
            return artifact
        student = student.cpu().eval()
        return self._export(student, artifact, ctx, pre)

    def _export(self, student: torch.nn.Module, artifact: Artifact, ctx: PassContext, pre: Any) -> Artifact:
        """int8 QDQ ONNX of the fake-quant student, parity against it, and the student folder."""
        from compress.onnx.runtime import onnx_size_mb
        from compress.passes.export import sample_inputs
        from compress.quant.export import export_qat_fused, float_weights
        from compress.onnx.runtime import load_model

        cfg: QATConfig = self.config  # type: ignore[assignment]
        task = ctx.run.model.task
        example = sample_inputs(ctx, student, pre, 2, max_length=16)
        check = sample_inputs(ctx, student, pre, cfg.parity_examples, max_length=ctx.run.model.max_length)
        path = ctx.out_dir / "student.int8-qat.onnx"
        if ctx.run.target.edge is not None:  # phones: fixed shapes, mobile-EP graph, .ort (docs/edge.md)
            return self._export_edge(student, artifact, ctx, pre, example, check, path)
        with ctx.progress.task(f"{ctx.label}: int8 export", total=None):
            res = export_qat_fused(student, example, check, path, task=task, opset=cfg.opset, atol=cfg.atol,
                                   min_cosine=cfg.min_cosine, optimize=cfg.optimize)
        parity, fused, changes = res.parity, res.fused, res.changes
        if res.rejected is not None:
            ctx.event("fusion_rejected", max_abs_diff=res.rejected.max_abs_diff, cosine=res.rejected.cosine)
        left = float_weights(load_model(path))
        ctx.metrics.update(parity_max_abs_diff=parity.max_abs_diff, parity_cosine=parity.cosine, fused=fused,
                           size_mb=onnx_size_mb(path), float_weights_left=len(left), **changes)
        if not parity.ok:
            raise PassFailed(ctx.label, f"ONNX Runtime int8 output '{parity.output}' differs from the fake-quant "
                             f"PyTorch model: max abs diff {parity.max_abs_diff:.3g} (atol {cfg.atol}), cosine "
                             f"{parity.cosine:.6f} (min {cfg.min_cosine})")
        return self._finish(student, artifact, ctx, pre, path)

    def _export_edge(self, student: torch.nn.Module, artifact: Artifact, ctx: PassContext, pre: Any,
                     example: Any, check: Any, path: Any) -> Artifact:
        """The edge run's int8 file: `compress.onnx.edge.export_qat_edge` at the profile's shapes."""
        from compress.onnx.edge import export_qat_edge, profile
        from compress.onnx.runtime import onnx_size_mb
        from compress.tasks import get_task

        cfg: QATConfig = self.config  # type: ignore[assignment]
        task = ctx.run.model.task
        _, batch, seq = profile(ctx.run)  # type: ignore[misc]
        text = get_task(task).modality != "image"
        with ctx.progress.task(f"{ctx.label}: edge int8 export [{batch}x{seq if text else 'image'}]", total=None):
            m = export_qat_edge(student, example, check, path, task=task, batch=batch, seq=seq if text else None,
                                opset=cfg.opset, atol=cfg.atol, min_cosine=cfg.min_cosine)
        ctx.metrics.update({k: v for k, v in m.items() if k not in ("parity_ok", "parity_output")}, fused=False,
                           size_mb=onnx_size_mb(path))
        if not m["parity_ok"]:
            raise PassFailed(ctx.label, f"ONNX Runtime int8 output '{m['parity_output']}' of the edge graph differs "
                             f"from the fake-quant PyTorch model: max abs diff {m['parity_max_abs_diff']:.3g} "
                             f"(atol {cfg.atol}), cosine {m['parity_cosine']:.6f} (min {cfg.min_cosine})")
        if m["ort_max_abs_diff"] > 1e-3:
            raise PassFailed(ctx.label, f"the .ort file's output differs from the .onnx one by {m['ort_max_abs_diff']:.3g}")
        return self._finish(student, artifact, ctx, pre, path)

    def _finish(self, student: torch.nn.Module, artifact: Artifact, ctx: PassContext, pre: Any, path: Any) -> Artifact:
        """The student folder (fake quantization stripped, its scales beside it) and the shipped int8 file."""
        from compress.quant import fake

        state = fake.quant_state(student)
        folder = ctx.save_student(fake.strip_fake_quant(student), pre)
        from compress.prune.idmap import carry_id_map

        carry_id_map(artifact.model_dir, folder)  # a trimmed vocabulary: the teacher's ids go on (evaluate, ...)
        (folder / "qat-scales.json").write_text(json.dumps(state, indent=1))
        # the fp32 export and earlier PTQ models (of the student before QAT) stay, unshipped, as the references
        # evaluate compares the QAT student with (on a CPU without VNNI, ORT's dynamic int8 can be the faster)
        kept = [ModelFile(m.path, m.precision, m.method, m.format, shipped=False) for m in artifact.models]
        qat = ModelFile(path, precision="int8", method="qat", shipped=True)
        return artifact.replace(model_dir=folder, models=[*kept, qat], evaluation=None)
