"""distill: layer- and module-wise knowledge distillation of a student from the teacher.

The student is the artifact's current model (say, a pruned or searched one) or, with `student_layers`, the
teacher with that many uniformly chosen layers kept (weight inheritance). Losses (weights in `weights`): a
logit loss (forward/reverse KL, JSD, skew KL, TAID; `logit_loss`), hard-label cross-entropy, hidden-state
losses over the layer map, attention-probability KL, attention-output MSE, MiniLMv2 Q/K/V relations, and for
feature-extraction models an embedding loss. Layer losses follow a schedule: every layer every step
(`uniform`), modules in turn (`round-robin`), or OPTIMA's Thompson-sampling bandit (`optima`).
The loss terms come from compress.distill.objective, the loop from compress.train (resumable mid-pass; several
processes with `compress run --nproc N`, DDP). With TAID, t adapts from the logit term after each step."""
from __future__ import annotations

import json
import logging
from typing import Any

import torch
from pydantic import Field

from compress.artifact import Artifact
from compress.contracts import Kind
from compress.distill.objective import LogitLoss, LossWeights, ObjectiveConfig
from compress.distill.schedule import ScheduleConfig, make_scheduler, plot_schedule, relative_decrease
from compress.distill.teacher import TeacherConfig
from compress.passes.base import Pass, PassContext
from compress.passes.common import first_split, model_inputs, task_batches, train_seed
from compress.registry import register
from compress.train.trainer import StepHook, StepOutput, TrainConfig

log = logging.getLogger(__name__)

__all__ = ["Distill", "DistillConfig", "LogitLoss", "LossWeights"]


class DistillConfig(ObjectiveConfig, TeacherConfig, TrainConfig):  # fields in the order: train, teacher, objective, own
    """The trainer's settings, the teacher's, the objective's (losses, weights, layer map) plus these."""

    student_layers: int | None = Field(
        None, gt=0, description="Make the student from the teacher with this many uniformly chosen layers "
        "(weight inheritance); None: distil into the artifact's current model.")
    schedule: ScheduleConfig = Field(default_factory=lambda: ScheduleConfig(kind="uniform"),
                                     description="When each layer's losses are on: uniform, round-robin or optima.")
    reference_examples: int = Field(32, gt=0, description="Held-out examples of the fixed batch whose loss decrease rewards OPTIMA.")
    max_length: int | None = Field(None, gt=0, description="Max tokens per example (default: model.max_length).")
    nproc: int | None = Field(None, gt=0, description="Training processes (torchrun); default: `compress run --nproc`, else 1.")
    save_schedule_plot: bool = Field(True, description="Write the OPTIMA arm-per-round plot next to the student.")


class _DistillHook(StepHook):
    """After each step: TAID's t adapts from the logit term (the paper's distillation loss, not the total
    with the hidden and CE terms), and every OPTIMA round the bandit is rewarded with the relative decrease
    of the reference loss. Checkpointed (`state_dict`), so a resumed run continues the same way."""

    def __init__(self, objective: Any, sched: Any, reference: Any, optima: bool):
        self.objective, self.sched, self.reference, self.optima = objective, sched, reference, optima
        self.prev: float | None = None  # the last reference loss
        self.taid_t: list[float] = []  # t after each step, for the report

    def on_step_end(self, step: int, out: StepOutput) -> None:
        taid = self.objective.taid
        if taid is not None and "logit" in out.terms:
            self.taid_t.append(taid.update(out.terms["logit"]))
        if self.optima and step % self.sched.interval == 0:
            new = self.reference()
            reward = relative_decrease(self.prev, new) if self.prev is not None else 0.0
            self.sched.update(reward)
            self.sched.history[-1]["reference_loss"] = new
            self.prev = new

    def state_dict(self) -> dict[str, Any]:
        return {"prev": self.prev, "taid_t": list(self.taid_t)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.prev = state.get("prev")
        self.taid_t = list(state.get("taid_t", []))


@register
class Distill(Pass):
    """Distil the teacher into the student: logit, hidden, attention and relation losses; OPTIMA schedule."""

    type = "distill"
    Config = DistillConfig
    # 2: TAID's t follows the paper: a linear floor to t_end over the pass's steps (it was stuck near t_start),
    # adapted from the logit term (it was the total loss)
    version = "3"  # 3: the attention-map term turns the student's attention dropout off
    uses_data = ("train", "eval")
    consumes = (Kind.TORCH_STUDENT, Kind.TEACHER)
    produces = (Kind.TORCH_STUDENT,)

    def validate(self, run: Any) -> str | None:
        cfg: DistillConfig = self.config  # type: ignore[assignment]
        if run.data.train is None:
            return "distill needs data.train"
        if run.model.task == "feature-extraction" and cfg.weights.ce > 0:
            return "weights.ce: feature-extraction data has no labels to train on; set it to 0"
        if cfg.student_layers is not None and any(p.type == "search" for p in run.passes):
            return ("student_layers: the student comes from the search pass (the artifact's model); remove "
                    "student_layers so that distill trains the searched student")
        if cfg.fused_lm_head and run.model.task != "causal-lm":
            return "fused_lm_head: only causal-lm models have an LM head to fuse; remove it"
        if cfg.fused_lm_head and cfg.weights.ce > 0:
            return "fused_lm_head: the hard-label CE needs the full logits; set weights.ce to 0 or fused_lm_head false"
        return None

    def run(self, artifact: Artifact, ctx: PassContext) -> Artifact:
        from compress.train.launch import run_training

        return run_training(self, artifact, ctx, self.config.nproc)  # type: ignore[attr-defined]

    def train(self, artifact: Artifact, ctx: PassContext) -> Artifact:
        """The training itself, in this process (one of several under torchrun: rank 0 saves)."""
        from compress.distill.objective import DistillObjective
        from compress.distill.teacher import TeacherCache, prepare_teacher
        from compress.search.inherit import student_from_teacher
        from compress.train.distributed import is_main_process
        from compress.train.trainer import Trainer

        from compress.embed.hooks import distill_heads, embedding_defaults, save_student_folder, sentence_run

        cfg: DistillConfig = self.config  # type: ignore[assignment]
        sentence = sentence_run(ctx.run, artifact.teacher_dir)  # a sentence-transformers teacher (compress.embed)
        if sentence:
            cfg = embedding_defaults(cfg)
        seed = train_seed(cfg, ctx)
        torch.manual_seed(seed)  # projections, filters and TAID start the same for the same seed
        teacher = ctx.load_teacher(artifact)
        if cfg.student_layers is not None:  # a copy of the teacher's kept layers, made before it is frozen
            student, kept = student_from_teacher(teacher, cfg.student_layers)
            ctx.metrics["inherited_layers"] = [k + 1 for k in kept]
        else:
            student = ctx.load_student(artifact)  # e.g. the searched or pruned student of an earlier pass
        ctx.metrics["student_source"] = "teacher layers (student_layers)" if cfg.student_layers is not None else "artifact"
        teacher = prepare_teacher(teacher, cfg)
        teacher.to(ctx.device)
        student.to(ctx.device).train()
        pre = ctx.load_preprocessor(artifact)
        cache = None
        if cfg.teacher_cache:
            cache = TeacherCache(ctx.work_dir / "teacher-cache",
                                 namespace=json.dumps([str(artifact.teacher_dir), cfg.max_length]))
        from compress.prune.idmap import load_id_map

        id_map = None if cfg.student_layers is not None else load_id_map(artifact.model_dir)  # a trimmed vocabulary
        heads = None
        if sentence:
            heads = distill_heads(student, artifact.teacher_dir, ctx.run,
                                  None if cfg.student_layers is not None else artifact.model_dir)
        objective = DistillObjective(student, teacher, cfg, task=ctx.run.model.task, teacher_cache=cache,
                                     where=f"passes: '{ctx.label}'", teacher_id_map=id_map, sentence=heads)

        ref_split = first_split(ctx, "eval", "train")
        ref_batch = model_inputs(next(iter(task_batches(
            ctx, ref_split, pre, batch_size=cfg.reference_examples, limit=cfg.reference_examples,
            max_length=cfg.max_length, model=teacher))))
        ref_batch = {k: v.to(ctx.device) for k, v in ref_batch.items()}
        ctx.metrics["layer_map"] = [list(p) for p in objective.match_layers(ref_batch)]

        num_layers = objective.s_ad.num_layers
        sched_cfg = cfg.schedule
        if isinstance(sched_cfg.modules, int) and sched_cfg.modules > num_layers:  # a shallow student: one layer a module
            sched_cfg = sched_cfg.model_copy(update={"modules": num_layers})
        sched = make_scheduler(sched_cfg, num_layers)
        optima = cfg.schedule.kind == "optima"
        hook = _DistillHook(objective, sched, lambda: objective.reference_loss(ref_batch), optima)
        if optima:
            hook.prev = objective.reference_loss(ref_batch)
            ctx.metrics["reference_loss_start"] = hook.prev

        def loss_fn(model: torch.nn.Module, batch: dict[str, torch.Tensor], step: int) -> StepOutput:
            out = objective(batch, layers=sched.active_layers(step - 1), model=model)
            return StepOutput(loss=out.total, terms=out.floats())

        def batches(epoch: int) -> Any:  # with a teacher cache every epoch sees the same batches, so they hit
            return task_batches(ctx, "train", pre, batch_size=cfg.batch_size, shuffle=True,
                                seed=seed if cfg.teacher_cache else seed + epoch,
                                max_length=cfg.max_length, model=teacher)

        extra_state: dict[str, Any] = {"schedule": sched, "reference": hook}
        if objective.taid is not None:
            extra_state["taid"] = objective.taid
        trainer = Trainer(student, TrainConfig.subset(cfg, seed=seed), loss_fn=loss_fn, train_batches=batches,
                          checkpoint_dir=ctx.work_dir / "ckpt", extra_modules=objective.modules(),
                          extra_state=extra_state, progress=ctx.progress, hooks=[hook], label=ctx.label)
        if objective.taid is not None:  # the paper's linear floor: t reaches t_end by the last step of the pass
            objective.taid.total_steps = trainer.total_steps
        result = trainer.train()
        if objective.taid is not None:
            ctx.metrics["taid_t"] = list(hook.taid_t)
        if cfg.fused_lm_head:
            ctx.metrics.update(fused_lm_head_steps=objective.fused_steps,
                               fused_lm_head_kernel_steps=objective.fused_kernel_steps)
        if cache is not None:
            ctx.metrics.update(teacher_cache_hits=cache.hits, teacher_cache_misses=cache.misses)
        for rnd in sched.history:
            if rnd.get("reward") is not None:
                ctx.event("schedule_round", round=rnd["round"], step=rnd["step"], arms=list(rnd["arms"]),
                          reward=rnd["reward"], reference_loss=rnd.get("reference_loss"))
        ctx.metrics.update(
            steps=result["steps"], final_loss=result["final_loss"], loss_curve=result["loss_curve"],
            term_curves=result["term_curves"], train_device=result["device"], autocast=result["autocast"], process_group=result["process_group"],
            resumed_from=result.get("resumed_from"), student_layers=num_layers,
            student_params=sum(p.numel() for p in student.parameters()),
            teacher_params=sum(p.numel() for p in teacher.parameters()),
        )
        if not is_main_process():
            return artifact
        folder = ctx.save_student(student.cpu(), pre)
        if heads is not None:  # a sentence-transformers folder: pooling, the trained projection, normalisation
            save_student_folder(folder, heads, student, ctx.run, artifact.teacher_dir)
        if cfg.student_layers is None:  # the student keeps its (trimmed) vocabulary: hand the teacher's ids on
            from compress.prune.idmap import carry_id_map

            carry_id_map(artifact.model_dir, folder)
        if optima and cfg.save_schedule_plot and sched.history:
            plot_schedule(sched.history, ctx.out_dir / "schedule.png", title=f"{ctx.label}: OPTIMA arm per round")
        return artifact.replace(model_dir=folder)
