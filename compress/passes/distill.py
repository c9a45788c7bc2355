"""distill: layer- and module-wise knowledge distillation of a student from the teacher.

The student is the artifact's current model (say, a pruned or searched one) or, with `student_layers`, the
teacher with that many uniformly chosen layers kept (weight inheritance). Losses (weights in `weights`): a
logit loss (forward/reverse KL, JSD, skew KL, TAID; `logit_loss`), hard-label cross-entropy, hidden-state
losses over the layer map, attention-probability KL, attention-output MSE, MiniLMv2 Q/K/V relations, and for
feature-extraction models an embedding loss. Layer losses follow a schedule: every layer every step
(`uniform`), modules in turn (`round-robin`), or OPTIMA's Thompson-sampling bandit (`optima`).
Training is resumable mid-pass and runs in several processes with `compress run --nproc N` (DDP)."""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from compress.artifact import Artifact
from compress.distill.mapping import MappingConfig
from compress.distill.schedule import ScheduleConfig
from compress.distill.trainer import TrainConfig
from compress.errors import CompressError, InputError, PassFailed
from compress.passes.base import Pass, PassContext
from compress.passes.common import first_split, mean_pool, model_inputs, task_batches, train_seed
from compress.registry import register

log = logging.getLogger(__name__)

LogitLoss = Literal["forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "taid"]


class LossWeights(BaseModel):
    model_config = ConfigDict(extra="forbid")
    logit: float = Field(1.0, ge=0, description="Logit distillation loss (`logit_loss`).")
    ce: float = Field(0.0, ge=0, description="Hard-label cross-entropy on the data's labels.")
    hidden: float = Field(1.0, ge=0, description="Hidden-state loss over the layer map (`hidden_loss`).")
    attention: float = Field(0.0, ge=0, description="KL between teacher and student attention probabilities (valid tokens).")
    attention_output: float = Field(0.0, ge=0, description="MSE between attention sub-layer outputs.")
    relation: float = Field(0.0, ge=0, description="MiniLMv2 Q/K/V self-relation KL between the last layers.")
    embedding: float = Field(1.0, ge=0, description="Feature extraction: 1 - cosine of the mean-pooled embeddings.")


class DistillConfig(TrainConfig):
    student_layers: int | None = Field(
        None, gt=0, description="Make the student from the teacher with this many uniformly chosen layers "
        "(weight inheritance); None: distil into the artifact's current model.")
    logit_loss: LogitLoss = Field("forward_kl", description="Which logit loss.")
    temperature: float = Field(2.0, gt=0, description="Softmax temperature of the logit loss.")
    beta: float = Field(0.5, ge=0, le=1, description="JSD mixture weight (0: forward KL, 1: reverse KL).")
    alpha: float = Field(0.1, ge=0, le=1, description="Skew of skew KL / skew reverse KL.")
    hidden_loss: Literal["mse", "cosine", "ted"] = Field(
        "mse", description="Hidden-state loss: MSE, 1 - cosine, or MSE between TED task-aware filters of both sides "
        "(the teacher-side filter stays fixed; TED's first stage, training it on the task, is not done).")
    relation_heads: int | None = Field(None, gt=0, description="MiniLMv2 relation heads (default: the student's attention heads).")
    weights: LossWeights = Field(default_factory=LossWeights, description="Weight of each loss term.")
    mapping: MappingConfig = Field(default_factory=MappingConfig, description="Which teacher layer each student layer learns from.")
    schedule: ScheduleConfig = Field(default_factory=lambda: ScheduleConfig(kind="uniform"),
                                     description="When each layer's losses are on: uniform, round-robin or optima.")
    vocab_size: int | None = Field(
        None, gt=0, description="Causal LM: the real vocabulary both logit widths share (the rest is padding); "
        "default: the smaller width when teacher and student vocabularies are padded differently.")
    fused_lm_head: bool = Field(
        False, description="Causal LM: compute the logit loss through both LM heads in chunks of rows "
        "(compress.kernels on CUDA), never building the [tokens x vocab] student logits; needs weights.ce = 0.")
    reference_examples: int = Field(32, gt=0, description="Held-out examples of the fixed batch whose loss decrease rewards OPTIMA.")
    max_length: int | None = Field(None, gt=0, description="Max tokens per example (default: model.max_length).")
    nproc: int | None = Field(None, gt=0, description="Training processes (torchrun); default: `compress run --nproc`, else 1.")
    save_schedule_plot: bool = Field(True, description="Write the OPTIMA arm-per-round plot next to the student.")


class _RefState:
    """The last reference loss, checkpointed with the trainer so a resumed run rewards the bandit the same."""

    def __init__(self) -> None:
        self.prev: float | None = None

    def state_dict(self) -> dict[str, Any]:
        return {"prev": self.prev}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.prev = state.get("prev")


class _Trace:
    """Values recorded once per step for the report (TAID's t), checkpointed so a resumed run reports them all."""

    def __init__(self) -> None:
        self.values: list[float] = []

    def state_dict(self) -> dict[str, Any]:
        return {"values": list(self.values)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.values = list(state.get("values", []))


@register
class Distill(Pass):
    """Distil the teacher into the student: logit, hidden, attention and relation losses; OPTIMA schedule."""

    type = "distill"
    Config = DistillConfig
    version = "2"  # 2: TAID's t follows the linear floor to t_end over the pass's steps (was stuck near t_start)
    uses_data = ("train", "eval")

    def validate(self, run: Any) -> str | None:
        cfg: DistillConfig = self.config  # type: ignore[assignment]
        if run.data.train is None:
            return "distill needs data.train"
        if run.model.task == "feature-extraction" and cfg.weights.ce > 0:
            return "weights.ce: feature-extraction data has no labels to train on; set it to 0"
        if cfg.fused_lm_head and run.model.task != "causal-lm":
            return "fused_lm_head: only causal-lm models have an LM head to fuse; remove it"
        if cfg.fused_lm_head and cfg.weights.ce > 0:
            return "fused_lm_head: the hard-label CE needs the full logits; set weights.ce to 0 or fused_lm_head false"
        return None

    # ------------------------------------------------------------------ entry
    def run(self, artifact: Artifact, ctx: PassContext) -> Artifact:
        from compress.distill.trainer import distributed_env, launch_distributed

        cfg: DistillConfig = self.config  # type: ignore[assignment]
        nproc = cfg.nproc or ctx.nproc
        if nproc > 1 and distributed_env() is None:
            spec = ctx.work_dir / "ddp-spec.json"
            spec.write_text(json.dumps({
                "run": ctx.run.model_dump(mode="json"), "source": str(ctx.run.source) if ctx.run.source else None,
                "config": cfg.model_dump(mode="json", exclude_unset=True), "artifact": artifact.to_json(Path("/")),
                "label": ctx.label, "out_dir": str(ctx.out_dir), "work_dir": str(ctx.work_dir), "seed": ctx.seed,
            }))
            code = launch_distributed(nproc, ["-m", "compress.passes.distill", str(spec)])
            failure = ctx.work_dir / "ddp-error.json"
            if code != 0 and failure.is_file():  # a child raised one of ours: same exit code, same message
                err = json.loads(failure.read_text())
                failure.unlink()
                if err["exit_code"] == 2:
                    raise InputError(err["message"])
                raise PassFailed(ctx.label, err["message"].removeprefix(f"pass '{ctx.label}' failed: "))
            if code != 0:
                raise PassFailed(ctx.label, f"distributed training with {nproc} processes exited with code {code}")
            result = json.loads((ctx.out_dir / "distill-result.json").read_text())
            (ctx.out_dir / "distill-result.json").unlink()
            ctx.metrics.update(result["metrics"], nproc=nproc)
            ctx.events.extend(result["events"])
            return artifact.replace(model_dir=ctx.out_dir / "model")
        return self.train(artifact, ctx)

    def train(self, artifact: Artifact, ctx: PassContext) -> Artifact:
        from compress.distill import losses
        from compress.distill.mapping import dynamic_map
        from compress.distill.schedule import make_scheduler, plot_schedule, relative_decrease
        from compress.distill.trainer import StepOutput, Trainer, distributed_env, prepare_teacher
        from compress.models import get_adapter
        from compress.search.inherit import student_from_teacher

        cfg: DistillConfig = self.config  # type: ignore[assignment]
        task = ctx.run.model.task
        seed = train_seed(cfg, ctx)
        torch.manual_seed(seed)  # projections, filters and TAID start the same for the same seed
        teacher = ctx.load_teacher(artifact)
        if cfg.student_layers is not None:  # a copy of the teacher's kept layers, made before it is frozen
            student, kept = student_from_teacher(teacher, cfg.student_layers)
            ctx.metrics["inherited_layers"] = [k + 1 for k in kept]
        else:
            student = ctx.load_student(artifact)
        teacher = prepare_teacher(teacher, cfg)
        device = ctx.device
        teacher.to(device)
        student.to(device).train()
        pre = ctx.load_preprocessor(artifact)
        s_ad, t_ad = get_adapter(student), get_adapter(teacher)
        pairs = cfg.mapping.resolve(s_ad.num_layers, t_ad.num_layers)
        w = cfg.weights
        feat = task == "feature-extraction"
        ds, dt = s_ad.hidden_size, t_ad.hidden_size
        projections = nn.ModuleDict()
        need_proj = (w.hidden > 0 or w.attention_output > 0 or (feat and w.embedding > 0))
        if need_proj:
            for s in sorted({s for s, _ in pairs} | ({s_ad.num_layers} if feat else set())):
                projections[str(s)] = losses.HiddenProjector(ds, dt)
        filters = nn.ModuleDict()
        if cfg.hidden_loss == "ted" and w.hidden > 0:
            for s, _ in pairs:
                filters[str(s)] = losses.TaskAwareFilter(ds, dt)
                filters[str(s)].freeze_teacher()
        projections.to(device)
        filters.to(device)

        ref_split = first_split(ctx, "eval", "train")
        ref_batch = model_inputs(next(iter(task_batches(
            ctx, ref_split, pre, batch_size=cfg.reference_examples, limit=cfg.reference_examples,
            max_length=cfg.max_length, model=teacher))))
        ref_batch = {k: v.to(device) for k, v in ref_batch.items()}

        if cfg.mapping.strategy == "dynamic":
            with torch.no_grad(), s_ad.capture(detach=True) as sc, t_ad.capture(detach=True) as tc:
                student(**ref_batch)
                teacher(**ref_batch)
                pairs = dynamic_map(sc.hidden_states, tc.hidden_states, projections if len(projections) else None,
                                    teacher_layers=cfg.mapping.teacher_layers,
                                    attention_mask=ref_batch.get("attention_mask"))
        ctx.metrics["layer_map"] = [list(p) for p in pairs]

        sched_cfg = cfg.schedule
        if isinstance(sched_cfg.modules, int) and sched_cfg.modules > s_ad.num_layers:  # a shallow student: one layer a module
            sched_cfg = sched_cfg.model_copy(update={"modules": s_ad.num_layers})
        sched = make_scheduler(sched_cfg, s_ad.num_layers)
        ref_state = _RefState()
        taid = losses.TAID() if cfg.logit_loss == "taid" else None
        caps = dict(hidden_states=w.hidden > 0 or feat, attentions=w.attention > 0,
                    attention_outputs=w.attention_output > 0, qkv=w.relation > 0)

        def shared_vocab(vs: int, vt: int) -> int | None:
            if cfg.vocab_size is not None:
                return cfg.vocab_size
            return min(vs, vt) if vs != vt else None

        def logit_term(s_logits: torch.Tensor, t_logits: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
            if task == "causal-lm":  # position t predicts token t+1; score the positions with a label
                s_logits, t_logits = s_logits[:, :-1], t_logits[:, :-1]
                labels = labels[:, 1:] if labels is not None else None
                s_logits = s_logits.reshape(-1, s_logits.shape[-1])
                t_logits = t_logits.reshape(-1, t_logits.shape[-1])
                labels = labels.reshape(-1) if labels is not None else None
            else:
                labels = None
            kw: dict[str, Any] = {"temperature": cfg.temperature, "labels": labels,
                                  "vocab_size": shared_vocab(s_logits.shape[-1], t_logits.shape[-1])}
            if taid is not None:
                return taid(s_logits, t_logits, **kw)
            if cfg.logit_loss == "jsd":
                kw["beta"] = cfg.beta
            elif cfg.logit_loss in ("skew_kl", "skew_reverse_kl"):
                kw["alpha"] = cfg.alpha
            return getattr(losses, cfg.logit_loss)(s_logits, t_logits, **kw)

        fused_calls = [0, 0]  # calls, calls that ran the fused kernel (CUDA, or CPU under the interpreter)

        def fused_logit_term(s_h: torch.Tensor, t_h: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
            from compress.kernels import kernel_usable

            fused_calls[0] += 1
            fused_calls[1] += int(kernel_usable(s_h))
            s_h, t_h = s_h[:, :-1].reshape(-1, s_h.shape[-1]), t_h[:, :-1].reshape(-1, t_h.shape[-1])
            kw: dict[str, Any] = {"temperature": cfg.temperature, "beta": cfg.beta, "alpha": cfg.alpha,
                                  "labels": labels[:, 1:].reshape(-1) if labels is not None else None,
                                  "vocab_size": shared_vocab(s_ad.head.weight.shape[0], t_ad.head.weight.shape[0])}
            if taid is not None:
                kw["taid_t"] = float(taid.t)
            return losses.fused_linear_kd(s_h, s_ad.head.weight, (t_h, t_ad.head.weight), kind=cfg.logit_loss, **kw)

        def embedding_term(s_h: torch.Tensor, t_h: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
            s_e = projections[str(s_ad.num_layers)](mean_pool(s_h, mask))
            return 1 - torch.nn.functional.cosine_similarity(s_e, mean_pool(t_h, mask), dim=-1).mean()

        cache = None
        if cfg.teacher_cache:
            from compress.distill.trainer import TeacherCache

            cache = TeacherCache(ctx.work_dir / "teacher-cache", namespace=json.dumps(
                [str(artifact.teacher_dir), caps, cfg.max_length], sort_keys=True))

        fused = cfg.fused_lm_head
        if fused:
            for ad, who in ((s_ad, "student"), (t_ad, "teacher")):
                if ad.head is None or not isinstance(getattr(ad.head, "weight", None), torch.Tensor):
                    raise InputError(f"passes: '{ctx.label}'.fused_lm_head: the {who} has no LM head weight to fuse")
                if getattr(ad.head, "bias", None) is not None:
                    raise InputError(f"passes: '{ctx.label}'.fused_lm_head: the {who}'s LM head has a bias; set it false")

        def run_teacher(inputs: dict[str, torch.Tensor], capture: dict[str, bool]) -> tuple[Any, Any]:
            with torch.no_grad(), t_ad.capture(detach=True, **capture) as tc:
                t_out = t_ad.base_model(**inputs) if fused and capture is caps else teacher(**inputs)
            return t_out, tc

        def cached_teacher(inputs: dict[str, torch.Tensor], capture: dict[str, bool]) -> tuple[Any, Any]:
            def compute(b: Any) -> dict[str, Any]:
                t_out, tc = run_teacher(dict(b), capture)
                return {"out": {k: v for k, v in t_out.items() if k in ("logits", "last_hidden_state")},
                        "hidden_states": list(tc.hidden_states), "attentions": list(tc.attentions),
                        "attention_outputs": list(tc.attention_outputs), "q": list(tc.q), "k": list(tc.k),
                        "v": list(tc.v)}

            got = cache.cached(compute, inputs)  # type: ignore[union-attr]
            return SimpleNamespace(**got["out"]), SimpleNamespace(**{k: v for k, v in got.items() if k != "out"})

        def forward_both(batch: dict[str, torch.Tensor], capture: dict[str, bool], model: nn.Module = student
                         ) -> tuple[Any, Any, Any, Any]:
            inputs = model_inputs(batch)
            use_cache = cache is not None and capture is caps
            t_out, tc = cached_teacher(inputs, capture) if use_cache else run_teacher(inputs, capture)
            with s_ad.capture(**capture) as sc:
                if fused and capture is caps:  # the logit loss goes through the heads in fused_logit_term
                    s_out = s_ad.base_model(**inputs)
                else:
                    s_out = model(**(batch if (w.ce > 0 and "labels" in batch and not feat) else inputs))
            return s_out, t_out, sc, tc

        def loss_fn(model: nn.Module, batch: dict[str, torch.Tensor], step: int) -> StepOutput:
            active = sched.active_layers(step - 1)
            s_out, t_out, sc, tc = forward_both(batch, caps, model)
            mask = batch.get("attention_mask")
            terms: dict[str, torch.Tensor] = {}
            if feat:
                if w.embedding > 0:
                    terms["embedding"] = embedding_term(s_out.last_hidden_state, t_out.last_hidden_state, mask)
            else:
                if w.logit > 0 and fused:
                    terms["logit"] = fused_logit_term(s_out.last_hidden_state, t_out.last_hidden_state,
                                                      batch.get("labels"))
                elif w.logit > 0:
                    terms["logit"] = logit_term(s_out.logits, t_out.logits, batch.get("labels"))
                if w.ce > 0 and getattr(s_out, "loss", None) is not None:
                    terms["ce"] = s_out.loss
            live = [(s, t) for s, t in pairs if s in active or s == 0]
            if w.hidden > 0 and live:
                if cfg.hidden_loss == "ted":
                    hid = [filters[str(s)](sc.hidden_states[s], tc.hidden_states[t], mask) for s, t in live]
                else:
                    fn = losses.hidden_mse if cfg.hidden_loss == "mse" else losses.hidden_cosine
                    hid = [fn(sc.hidden_states[s], tc.hidden_states[t], projections[str(s)], attention_mask=mask)
                           for s, t in live]
                terms["hidden"] = sum(hid) / len(hid)
            blocks = [(s, t) for s, t in live if s >= 1 and t >= 1]
            if w.attention > 0 and blocks:
                terms["attention"] = sum(
                    losses.attention_kl(sc.attentions[s - 1], tc.attentions[t - 1], mask) for s, t in blocks) / len(blocks)
            if w.attention_output > 0 and blocks:
                terms["attention_output"] = sum(
                    losses.attention_output_mse(projections[str(s)](sc.attention_outputs[s - 1]),
                                                tc.attention_outputs[t - 1], mask) for s, t in blocks) / len(blocks)
            if w.relation > 0:
                heads = cfg.relation_heads or s_ad.num_heads
                terms["relation"] = losses.minilm_relation_kl(sc.q[-1], sc.k[-1], sc.v[-1], tc.q[-1], tc.k[-1], tc.v[-1],
                                                              mask, heads)
            total = sum(getattr(w, k) * v for k, v in terms.items())  # terms are named as LossWeights' fields
            if not isinstance(total, torch.Tensor):
                raise InputError(f"passes: '{ctx.label}'.weights: every loss weight is 0 for this task; set one above 0")
            return StepOutput(loss=total, terms={k: float(v.detach()) for k, v in terms.items()})

        def reference_loss() -> float:
            was_training = student.training
            student.eval()
            with torch.no_grad():
                s_out, t_out, _, _ = forward_both(ref_batch, {})
                mask = ref_batch.get("attention_mask")
                if feat:
                    value = embedding_term(s_out.last_hidden_state, t_out.last_hidden_state, mask)
                else:
                    value = logit_term(s_out.logits, t_out.logits, ref_batch.get("labels"))
            student.train(was_training)
            return float(value)

        taid_trace = _Trace()

        def on_step_end(step: int, out: StepOutput) -> None:
            if taid is not None:
                taid_trace.values.append(taid.update(out.loss))
            if cfg.schedule.kind == "optima" and step % sched.interval == 0:
                new = reference_loss()
                reward = relative_decrease(ref_state.prev, new) if ref_state.prev is not None else 0.0
                sched.update(reward)
                sched.history[-1]["reference_loss"] = new
                ref_state.prev = new

        if cfg.schedule.kind == "optima":
            ref_state.prev = reference_loss()
            ctx.metrics["reference_loss_start"] = ref_state.prev

        def batches(epoch: int) -> Any:  # with a teacher cache every epoch sees the same batches, so they hit
            return task_batches(ctx, "train", pre, batch_size=cfg.batch_size, shuffle=True,
                                seed=seed if cfg.teacher_cache else seed + epoch,
                                max_length=cfg.max_length, model=teacher)

        tcfg = TrainConfig(**{**{k: getattr(cfg, k) for k in TrainConfig.model_fields}, "seed": seed})
        extra_state: dict[str, Any] = {"schedule": sched, "reference": ref_state}
        if taid is not None:
            extra_state.update(taid=taid, taid_trace=taid_trace)
        trainer = Trainer(student, tcfg, loss_fn=loss_fn, train_batches=batches, checkpoint_dir=ctx.work_dir / "ckpt",
                          extra_modules={"projections": projections, "filters": filters}, extra_state=extra_state,
                          progress=ctx.progress, on_step_end=on_step_end, label=ctx.label)
        if taid is not None:  # the paper's linear floor: t reaches t_end by the last step of the pass
            taid.total_steps = trainer.total_steps
        result = trainer.train()
        if taid is not None:
            ctx.metrics["taid_t"] = list(taid_trace.values)
        if fused:
            ctx.metrics.update(fused_lm_head_steps=fused_calls[0], fused_lm_head_kernel_steps=fused_calls[1])
        if cache is not None:
            ctx.metrics.update(teacher_cache_hits=cache.hits, teacher_cache_misses=cache.misses)
        for rnd in sched.history:
            if rnd.get("reward") is not None:
                ctx.event("schedule_round", round=rnd["round"], step=rnd["step"], arms=list(rnd["arms"]),
                          reward=rnd["reward"], reference_loss=rnd.get("reference_loss"))
        ctx.metrics.update(
            steps=result["steps"], final_loss=result["final_loss"], loss_curve=result["loss_curve"],
            train_device=result["device"], autocast=result["autocast"], process_group=result["process_group"],
            resumed_from=result.get("resumed_from"), student_layers=s_ad.num_layers,
            student_params=sum(p.numel() for p in student.parameters()),
            teacher_params=sum(p.numel() for p in teacher.parameters()),
        )
        env = distributed_env()
        if env is not None and env[0] != 0:
            return artifact
        folder = ctx.save_student(student.cpu(), pre)
        if cfg.schedule.kind == "optima" and cfg.save_schedule_plot and sched.history:
            plot_schedule(sched.history, ctx.out_dir / "schedule.png", title=f"{ctx.label}: OPTIMA arm per round")
        return artifact.replace(model_dir=folder)


def _worker(spec_path: str) -> int:
    """Entry of each torchrun process for `--nproc N`: rebuild the pass context and train; rank 0 saves."""
    from compress.config import parse_config
    from compress.distill.trainer import distributed_env
    from compress.passes.base import DataProvider

    spec = json.loads(Path(spec_path).read_text())
    source = Path(spec["source"]) if spec["source"] else None
    run = parse_config(spec["run"], file=str(source or "<config>"), source=source, check_passes=False)
    ctx = PassContext(run=run, label=spec["label"], out_dir=Path(spec["out_dir"]), work_dir=Path(spec["work_dir"]),
                      seed=spec["seed"], data=DataProvider(run))
    ctx.seed_everything()
    artifact = Artifact.from_json(spec["artifact"], Path("/"))
    env = distributed_env()
    try:
        Distill(DistillConfig.model_validate(spec["config"])).train(artifact, ctx)
    except CompressError as err:
        if env is None or env[0] == 0:
            (ctx.work_dir / "ddp-error.json").write_text(json.dumps({"exit_code": err.exit_code, "message": str(err)}))
        return err.exit_code
    if env is None or env[0] == 0:
        (ctx.out_dir / "distill-result.json").write_text(json.dumps({"metrics": ctx.metrics, "events": ctx.events},
                                                                    default=str))
    return 0


if __name__ == "__main__":
    sys.exit(_worker(sys.argv[1]))
