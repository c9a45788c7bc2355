"""finetune: train the teacher on the task (the pipeline needs a task teacher to distil from)."""
from __future__ import annotations

from typing import Any

from pydantic import Field

from compress.artifact import Artifact
from compress.contracts import Kind
from compress.passes.base import Pass, PassContext
from compress.passes.common import task_batches, train_seed
from compress.registry import register
from compress.train.trainer import TrainConfig


class FinetuneConfig(TrainConfig):
    """The trainer's settings (epochs/steps, lr, batch size, schedule, checkpoints...) plus these."""

    max_length: int | None = Field(None, gt=0, description="Max tokens per example (default: model.max_length).")
    as_teacher: bool = Field(True, description="Make the fine-tuned model the teacher of the passes that follow.")


@register
class Finetune(Pass):
    """Fine-tune the model on data.train with a progress bar; seeded and resumable."""

    type = "finetune"
    Config = FinetuneConfig
    version = "1"
    uses_data = ("train",)
    consumes = (Kind.TORCH_STUDENT,)
    produces = (Kind.TORCH_STUDENT, Kind.TEACHER)  # the fine-tuned model is the teacher of what follows

    def validate(self, run: Any) -> str | None:
        return None if run.data.train is not None else "finetune needs data.train"

    def run(self, artifact: Artifact, ctx: PassContext) -> Artifact:
        from compress.train.trainer import StepOutput, Trainer

        cfg: FinetuneConfig = self.config  # type: ignore[assignment]
        model = ctx.load_student(artifact).to(ctx.device)
        pre = ctx.load_preprocessor(artifact)
        seed = train_seed(cfg, ctx)

        def batches(epoch: int) -> Any:
            return task_batches(ctx, "train", pre, batch_size=cfg.batch_size, shuffle=True,
                                seed=seed + epoch, max_length=cfg.max_length, model=model)

        def loss_fn(m: Any, batch: dict[str, Any], step: int) -> StepOutput:
            out = m(**batch)
            return StepOutput(loss=out.loss, terms={"task": float(out.loss.detach())})

        trainer = Trainer(model, TrainConfig.subset(cfg, seed=seed), loss_fn=loss_fn, train_batches=batches,
                          checkpoint_dir=ctx.work_dir / "ckpt", progress=ctx.progress, label=ctx.label)
        result = trainer.train()
        ctx.metrics.update(
            steps=result["steps"], final_loss=result["final_loss"], loss_curve=result["loss_curve"],
            resumed_from=result.get("resumed_from"),
        )
        folder = ctx.save_student(model.cpu(), pre)
        return artifact.replace(model_dir=folder, teacher_dir=folder if cfg.as_teacher else artifact.teacher_dir)
